"""Sharded checkpoints: save, find the latest complete one, load, keep the newest K.

A checkpoint is a DeepSpeed checkpoint directory `checkpoints/step_00000100/` (model and
optimizer shards as DeepSpeed lays them out for the ZeRO stage) plus:

- client state in DeepSpeed's model-state file: step, consumed tokens, data-loader position and
  fingerprint, MLflow run id, the resolved config and the parallel layout;
- `rank_00000.pt`, ... : each rank's RNG states (they differ per rank, DeepSpeed saves one copy);
- `COMPLETE`: written by rank 0 after every rank has finished writing. A directory without it
  is an interrupted save and is never resumed from.

The `latest` file beside the step directories names the head of the live lineage, in
DeepSpeed's format, so DeepSpeed's own tools (zero_to_fp32) work on our checkpoints. It is the
resume point of `run.resume=auto`, written last, by write-and-rename.

Crash safety and integrity: a save is written into `.saving-step_N/`; rank 0 then writes
`MANIFEST.sha256` (every file's sha256, in `sha256sum -c` format, hashed by all ranks in
parallel) and `COMPLETE`, renames the directory to `step_N/` and only then points `latest` at
it. A crash at any point leaves `latest` on the previous checkpoint. Loading verifies the
manifest and refuses a checkpoint with a changed or missing file, naming it.

Lineage: the step directories at the top of the checkpoint directory are one chain, the one
`latest` heads. A launch that does not continue `latest` (a rollback to an earlier step, or a
branch from another run's checkpoint) first moves every checkpoint that is not an ancestor of
its start into `abandoned/<time>-from-<tag>/`, where nothing resumes or prunes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pretrain.config import Config
from pretrain.distributed import Layout
from pretrain.errors import CheckpointError

COMPLETE = "COMPLETE"
PREFIX = "step_"
SAVING = ".saving-"  # a save in progress: ckpt_dir/.saving-step_00000100/
MANIFEST = "MANIFEST.sha256"
LATEST = "latest"
ABANDONED = "abandoned"
# Test hook, inert unless set: "STEP:RANK" makes that rank SIGKILL itself in the save of STEP,
# after writing its shards (tests/distributed/test_checkpoint_lineage.py, crash safety).
KILL_IN_SAVE_ENV = "PRETRAIN_TEST_KILL_IN_SAVE"


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def read_latest(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / LATEST
    return f.read_text().strip() if f.is_file() else None


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.name.startswith(PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def head(ckpt_dir: Path) -> Path | None:
    """The live lineage's newest checkpoint: the one `latest` names. Never the highest step
    number, which after a rollback may belong to an abandoned branch. Without a `latest` file
    (a directory copied without it) the newest complete checkpoint."""
    tag = read_latest(ckpt_dir)
    if tag is None:
        found = complete_checkpoints(ckpt_dir)
        return found[-1] if found else None
    path = ckpt_dir / tag
    if not is_complete(path):
        raise CheckpointError(
            f"{ckpt_dir / LATEST} names {tag!r}, which is not a complete checkpoint; pass the "
            f"step directory to resume from as run.resume=PATH"
        )
    return path


def resolve_resume(resume: str, ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from for `run.resume`, or None to start fresh."""
    if resume == "never":
        if complete_checkpoints(ckpt_dir):
            raise CheckpointError(
                f"run.resume=never but {ckpt_dir} already holds checkpoints; use run.resume=auto "
                f"to continue, or a new run.name / output_dir to start over"
            )
        return None
    if resume == "auto":
        return head(ckpt_dir)
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(
            f"run.resume={resume!r}: no such checkpoint; pass a step directory "
            f"like {ckpt_dir / tag_for(100)} or use run.resume=auto"
        )
    if not path.name.startswith(PREFIX):  # a checkpoints directory: its head
        found = head(path)
        if found is None:
            raise CheckpointError(f"run.resume={resume!r} holds no complete checkpoint")
        return found
    if not is_complete(path):
        raise CheckpointError(
            f"checkpoint {path} is incomplete (no {COMPLETE} marker: the save was interrupted); "
            f"pass an earlier step directory or use run.resume=auto"
        )
    return path


def check_compatible(path: Path, cfg: Config, data_identity: dict[str, Any], dp: int) -> list[str]:
    """Refuse, before any process group exists, a resume that would fail or silently
    misbehave after start-up: another model, or other data than the checkpoint was trained
    on. Returns what differs in the layout (empty: DeepSpeed loads it as saved), which
    pretrain.reshard then bridges."""
    from pretrain import reshard

    meta = json.loads((path / COMPLETE).read_text())
    exclude = cfg.checkpoint.exclude_from_loading
    saved_shape = meta.get("model")  # absent from checkpoints of older versions
    if saved_shape is not None:
        mine = model_shape(cfg)
        diff = [
            f"model.{k}: checkpoint {v!r}, this run {mine.get(k)!r}"
            for k, v in saved_shape.items()
            # The padded row count follows the layout; the tokenizer's size must not change.
            if mine.get(k) != v and k != "vocab_size"
        ]
        if diff:
            # No override: weights of another shape cannot be loaded, whatever is excluded.
            raise CheckpointError(
                f"checkpoint {path} holds a model of another shape ({'; '.join(diff)}): set "
                f"those values back to resume it, or train the new shape as a new run "
                f"(another run.name, or run.resume=never)"
            )
    change = layout_change(meta, cfg, dp)
    if change:
        reshard.check_reshardable(path, meta, saved_shape or {}, cfg.model.vocab_size)
    saved = meta.get("data") or {}
    if "data" not in exclude and saved:
        from data_pipeline.loader import with_defaults

        # data_identity: the state_dict() of the loader this run will build, less its position.
        for key, saved_value in with_defaults(saved).items():
            if data_identity.get(key) != saved_value:
                raise CheckpointError(
                    f"checkpoint {path} was trained on data with {key} {saved_value!r}, this "
                    f"run's is {data_identity.get(key)!r}: resume with the same data and "
                    f"settings, or add 'data' to checkpoint.exclude_from_loading to start the "
                    f"data afresh"
                )
    return change


def layout_change(meta: dict[str, Any], cfg: Config, dp: int) -> list[str]:
    """How this run's layout differs from the checkpoint's where DeepSpeed's loader cannot
    follow ('tp 2 -> 1', ...); empty when it loads the checkpoint as saved."""
    from pretrain import reshard
    from pretrain.engine import effective_zero_stage

    p = cfg.parallel
    wanted = {
        "tp": p.tp,
        "pp": p.pp,
        "dp": dp,
        "zero_stage": effective_zero_stage(cfg, dp),
        "precision": cfg.run.precision,
        "vocab_rows": cfg.model.vocab_size,
    }
    return reshard.changes(reshard.layout_of(meta), wanted)


def check_files(path: Path) -> None:
    """Refuse, before any process group exists, a checkpoint with a file missing: one its
    manifest lists (model and optimizer shards, rank files) or a rank file of a rank that
    saved it. Sizes and checksums are left to `verify`, which hashes in parallel once the
    ranks exist."""
    meta = json.loads((path / COMPLETE).read_text())
    expected = set(read_manifest(path) or ())
    expected |= {f"rank_{r:05d}.pt" for r in range(int(meta.get("world_size", 0)))}
    missing = sorted(name for name in expected if not (path / name).is_file())
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        shown = ", ".join(missing[:3]) + more
        raise CheckpointError(
            f"checkpoint {path} is incomplete: {shown} missing; restore the files from a copy, "
            f"or resume from another checkpoint (run.resume=PATH)"
        )


def model_shape(cfg: Config) -> dict[str, Any]:
    """The model settings that decide the weights' names and shapes, recorded in COMPLETE and
    compared on resume (a change would fail inside DeepSpeed's strict load, or worse)."""
    m = cfg.model
    return {
        "family": m.family,
        "n_layers": m.n_layers,
        "n_decoder_layers": m.decoder_layers,
        "d_model": m.d_model,
        "n_heads": m.n_heads,
        "n_kv_heads": m.kv_heads,
        "ffn_hidden": m.ffn_size,
        "vocab_size": m.vocab_size,
        "tokenizer_vocab": m.tokenizer_vocab,
        "activation": m.activation,
        "positions": m.positions,
        "norm": m.norm,
        "bias": m.bias,
        "tie_embeddings": m.tie_embeddings,
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(
    engine: Any,
    layout: Layout,
    ckpt_dir: Path,
    step: int,
    client_state: dict[str, Any],
    rank_state: dict[str, Any],
    keep_last: int,
    keep_every: int = 0,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory.

    Written into `.saving-step_N/` and renamed to `step_N/` once complete, so a crash at any
    point leaves no directory that looks like a checkpoint and `latest` on the previous one."""
    tag = tag_for(step)
    path, work = ckpt_dir / tag, ckpt_dir / (SAVING + tag)
    if layout.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        # Leftovers of crashed saves: saves of one directory never run concurrently.
        for old in ckpt_dir.glob(SAVING + "*"):
            shutil.rmtree(old)
    dist.barrier()
    engine.save_checkpoint(
        str(ckpt_dir), tag=work.name, client_state=client_state, save_latest=False
    )
    torch.save(rank_state, work / f"rank_{layout.rank:05d}.pt")
    _kill_hook(step, layout.rank)
    dist.barrier()  # every shard is on disk before it is hashed
    manifest = _hash_files(work, layout)
    dims: list[Any] = [None] * layout.world_size
    dist.all_gather_object(dims, tp_dims(engine.module))
    if layout.is_main:
        (work / MANIFEST).write_text("".join(f"{h}  {name}\n" for name, h in manifest))
        meta = {
            "step": step,
            "world_size": layout.world_size,
            "dp": layout.dp_size,
            "tp": layout.tp_size,
            "pp": layout.pp_size,
            "zero_stage": engine.zero_optimization_stage(),
            "data": {k: v for k, v in client_state["data"].items() if k != "consumed"},
            # How each tensor-parallel parameter is split, for resharding (pretrain.reshard).
            "tp_dims": {k: v for part in dims for k, v in part.items()},
            "time": time.time(),
            **(extra_meta or {}),
        }
        _write_atomic(work / COMPLETE, json.dumps(meta))
        if path.exists():  # only a save that crashed before `latest` named it: keep it aside
            _move_aside(ckpt_dir, [path], f"replaced-{tag}")
        os.rename(work, path)
        _write_atomic(ckpt_dir / LATEST, tag)  # the commit point
        _prune(ckpt_dir, keep_last, keep_every)
    dist.barrier()
    return path


def tp_dims(module: Any) -> dict[str, int]:
    """{one-process parameter name: the dimension its tensor-parallel shards split} of this
    rank's (stage's) parameters; replicated ones are absent. megatron's layers and ours mark
    split parameters with `tensor_model_parallel` and `partition_dim`."""
    from pretrain.reshard import _model_names

    names = _model_names(module)
    return {
        names.get(n, n): int(p.partition_dim)
        for n, p in module.named_parameters()
        if getattr(p, "tensor_model_parallel", False)
    }


def _kill_hook(step: int, rank: int) -> None:
    """Crash-safety test hook: inert unless KILL_IN_SAVE_ENV names this step and rank."""
    spec = os.environ.get(KILL_IN_SAVE_ENV)
    if spec and spec == f"{step}:{rank}":
        os.kill(os.getpid(), signal.SIGKILL)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _hash_files(directory: Path, layout: Layout) -> list[tuple[str, str]]:
    """(relative name, sha256) of every file under `directory`, sorted. Collective: rank 0
    lists the files (one listing, whatever another node's file-system cache shows) and each
    rank hashes every world_size-th one, so hashing costs 1/world_size of the bytes per rank."""
    names: list[Any] = [None]
    if layout.is_main:
        names = [sorted(str(f.relative_to(directory)) for f in directory.rglob("*") if f.is_file())]
    dist.broadcast_object_list(names, src=0)
    mine = {
        n: _sha256(directory / n)
        for i, n in enumerate(names[0])
        if i % layout.world_size == layout.rank
    }
    gathered: list[Any] = [None] * layout.world_size
    dist.all_gather_object(gathered, mine)
    merged = {k: v for part in gathered for k, v in part.items()}
    return sorted(merged.items())


def read_manifest(path: Path) -> dict[str, str] | None:
    """{relative name: sha256} of a checkpoint, or None for one saved before manifests."""
    f = path / MANIFEST
    if not f.is_file():
        return None
    out = {}
    for line in f.read_text().splitlines():
        digest, name = line.split("  ", 1)
        out[name] = digest
    return out


def verify_files(path: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """Problems (one line per bad file) with this rank's share of `path`'s manifest."""
    manifest = read_manifest(path)
    if manifest is None:
        return []
    problems = []
    for i, (name, digest) in enumerate(sorted(manifest.items())):
        if i % world_size != rank:
            continue
        f = path / name
        if not f.is_file():
            problems.append(f"{f} is missing")
        elif _sha256(f) != digest:
            problems.append(f"{f} does not match its checksum in {MANIFEST}")
    return problems


def verify(path: Path, layout: Layout) -> None:
    """Collective: refuse, on every rank alike, a checkpoint whose files changed since the
    save (bit rot, a truncated copy). Each rank hashes its share of the files."""
    mine = verify_files(path, layout.rank, layout.world_size)
    gathered: list[Any] = [None] * layout.world_size
    dist.all_gather_object(gathered, mine)
    problems = [p for part in gathered for p in part]
    if problems:
        raise CheckpointError(
            f"checkpoint {path} is damaged: {'; '.join(problems)}; resume from another "
            f"checkpoint (run.resume=PATH) or restore the file from a copy"
        )


def agree(path: Path | None, layout: Layout) -> None:
    """Collective: every rank resolved `run.resume` on its own before the process group
    existed; refuse unless all of them chose rank 0's checkpoint (a stale listing of a shared
    file system can show another node an older `latest`)."""
    gathered: list[Any] = [None] * layout.world_size
    dist.all_gather_object(gathered, str(path) if path is not None else None)
    differ = [(r, p) for r, p in enumerate(gathered) if p != gathered[0]]
    if differ:
        r, other = differ[0]
        raise CheckpointError(
            f"ranks disagree on the checkpoint to resume: rank 0 chose {gathered[0]}, rank {r} "
            f"chose {other}; the file system shows them different listings, so pass the step "
            f"directory explicitly as run.resume=PATH"
        )


def _move_aside(ckpt_dir: Path, paths: list[Path], label: str) -> Path:
    """Move checkpoints out of the live lineage into abandoned/<time>-<label>/, where nothing
    resumes or prunes them; deleting them is left to the user."""
    dest = ckpt_dir / ABANDONED / f"{time.strftime('%Y%m%d-%H%M%S')}-{label}"
    dest.mkdir(parents=True, exist_ok=True)
    for p in paths:
        os.rename(p, dest / p.name)
    return dest


def start_branch(ckpt_dir: Path, resumed_from: Path | None) -> str | None:
    """Rank 0, once the ranks have loaded: make the top of `ckpt_dir` hold only this launch's
    lineage. Continuing `latest` changes nothing; any other start (a rollback to an earlier
    step, a branch from another run's checkpoint) moves every checkpoint that is not an
    ancestor of it aside, then points `latest` at the start. Returns a line to print, or None."""
    if not ckpt_dir.is_dir():
        return None
    here = resumed_from is not None and resumed_from.parent.resolve() == ckpt_dir.resolve()
    if here and resumed_from.name == read_latest(ckpt_dir):
        return None
    fork = step_of(resumed_from) if here else -1
    doomed = [
        p
        for p in sorted(ckpt_dir.iterdir())
        if p.is_dir() and p.name.startswith(PREFIX) and step_of(p) > fork
    ]
    label = f"from-{resumed_from.name}" if resumed_from is not None else "fresh"
    # Move first, then repoint `latest`: a crash in between leaves `latest` naming a moved
    # directory, which head() refuses with a message, rather than resuming the old branch.
    dest = _move_aside(ckpt_dir, doomed, label) if doomed else None
    if here:
        _write_atomic(ckpt_dir / LATEST, resumed_from.name)
    elif (ckpt_dir / LATEST).exists():
        (ckpt_dir / LATEST).unlink()
    if dest is None:
        return None
    return (
        f"new branch {label}: moved {', '.join(p.name for p in doomed)} to {dest} (never "
        f"resumed or pruned there; delete it when no longer wanted)"
    )


def _prune(ckpt_dir: Path, keep_last: int, keep_every: int = 0) -> None:
    """Keep the newest `keep_last` complete checkpoints (0: all) and every step divisible by
    `keep_every`. Only the live lineage is at the top of ckpt_dir (start_branch), so step order
    is lineage order here."""
    complete = complete_checkpoints(ckpt_dir)
    doomed = complete[:-keep_last] if keep_last else []
    doomed = [p for p in doomed if not (keep_every and step_of(p) % keep_every == 0)]
    newest = step_of(complete[-1]) if complete else -1
    # Interrupted saves of older versions (no .saving- prefix) older than the newest complete
    # one can never be resumed from.
    doomed += [
        p
        for p in ckpt_dir.iterdir()
        if p.name.startswith(PREFIX) and not is_complete(p) and step_of(p) < newest
    ]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)


def load(
    engine: Any, layout: Layout, path: Path, exclude: list[str], cfg: Config | None = None
) -> tuple[dict, dict | None]:
    """Load a complete checkpoint into the engine. Returns (client_state, this rank's state or
    None when the checkpoint has no file for this rank: saved by fewer ranks, or with other
    tp, pp or dp, whose per-rank streams do not map onto this one's). A checkpoint of another
    layout (with `cfg`) is loaded from its consolidated form (pretrain.reshard)."""
    from pretrain import reshard

    meta = json.loads((path / COMPLETE).read_text())
    if cfg is None:
        # Without the run's config only the process layout is known: the rest is as saved, and
        # a change can only be refused, not resharded.
        saved = reshard.layout_of(meta)
        here = {"tp": layout.tp_size, "pp": layout.pp_size, "dp": layout.dp_size}
        change = reshard.changes(saved, {**saved, **here})
        if change:
            raise CheckpointError(
                f"checkpoint {path} was saved with another layout ({', '.join(change)}): "
                f"resume with the checkpoint's layout, or give the run's config to reshard it"
            )
    else:
        change = layout_change(meta, cfg, layout.dp_size)
    if change:
        udir = reshard.ensure_universal(path)  # made in prepare(); here if it was not
    verify(path, layout)
    if cfg is not None and change:
        client_state = reshard.load_universal(engine, layout, cfg, udir, exclude)
        same_ranks = [meta["tp"], meta["pp"], meta["dp"]] == [
            layout.tp_size,
            layout.pp_size,
            layout.dp_size,
        ]
        # Only the optimizer's form changed (ZeRO stage, precision, vocabulary padding): every
        # rank is the rank that saved, and its RNG streams continue where they were.
        return client_state, _rank_state(path, layout, meta) if same_ranks else None
    with _read_once(getattr(engine, "checkpoint_engine", None)):
        load_path, client_state = engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_optimizer_states="optimizer" not in exclude,
            load_lr_scheduler_states="scheduler" not in exclude,
            load_module_strict=True,
        )
    if load_path is None:
        raise CheckpointError(
            f"DeepSpeed could not load {path}; check that it is a checkpoint of this model"
        )
    return client_state, _rank_state(path, layout, meta)


@contextlib.contextmanager
def _read_once(checkpoint_engine: Any) -> Iterator[None]:
    """Within, a file DeepSpeed's checkpoint engine loads is read from disk once.

    DeepSpeed's load_checkpoint reads the model-states file twice: whole, to check the model-
    parallel size saved in it (SDLoaderBase.check_ckpt_list), then whole again to use it; for
    ZeRO-0 that file holds the weights and the optimizer's moments (4.25 GB for a 354M GPT).
    Here the first read's result is kept for the next request of the same file, when both ask
    to keep storages where they were saved (a callable map_location, as DeepSpeed's loader
    does), and handed out once; any other request reads the file as before. A file asked for
    only once (a pipeline's layer files) stays referenced until the next read or the end of the
    load: at most one file's tensors longer than before."""
    if checkpoint_engine is None:  # an engine without one (not DeepSpeed's): nothing to share
        yield
        return
    load = checkpoint_engine.load
    kept: dict[str, Any] = {}

    def load_once(path: str, map_location: Any = None) -> Any:
        if not callable(map_location):
            return load(path, map_location=map_location)
        if path in kept:
            return kept.pop(path)
        kept.clear()
        kept[path] = state = load(path, map_location=map_location)
        return state

    own = vars(checkpoint_engine).get("load")
    checkpoint_engine.load = load_once  # on this instance only, for this call
    try:
        yield
    finally:
        if own is None:
            del checkpoint_engine.load
        else:
            checkpoint_engine.load = own
        kept.clear()


def _rank_state(path: Path, layout: Layout, meta: dict[str, Any]) -> dict | None:
    rank_file = path / f"rank_{layout.rank:05d}.pt"
    if not rank_file.is_file() and layout.rank < meta["world_size"]:
        check_files(path)  # this rank saved one: its RNG state must not be silently dropped
    return torch.load(rank_file, weights_only=False) if rank_file.is_file() else None


def check_run_config(cfg: Config) -> None:
    """Refuse a run directory whose config.yaml (written by every launch) describes another
    model: the launch would mix two runs' logs and checkpoints. Compared are the settings that
    shape the weights (model_shape), as a resume compares them."""
    import yaml

    from pretrain.config import ConfigError

    path = cfg.run.run_dir / "config.yaml"
    try:
        old = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return
    mine = model_shape(cfg)
    differ = {
        k: (old.get(k), v)
        for k, v in mine.items()
        if k in old and old[k] is not None and old[k] != v and k not in ("n_decoder_layers",)
    }
    if differ:
        what = ", ".join(f"model.{k} {a!r} there, {b!r} here" for k, (a, b) in differ.items())
        raise ConfigError(
            "run.name",
            cfg.run.name,
            f"the run directory {cfg.run.run_dir} holds another run's config ({what}); use a new "
            f"run.name or run.output_dir, or remove that directory",
        )
