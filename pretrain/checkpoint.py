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

import hashlib
import json
import os
import shutil
import signal
import time
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


def check_compatible(path: Path, cfg: Config, data_identity: dict[str, Any], dp: int) -> None:
    """Refuse, before any process group exists, a resume that would fail or silently
    misbehave after start-up: another model-parallel layout, another ZeRO stage or data-parallel
    size for sharded optimizer state, or other data than the checkpoint was trained on."""
    meta = json.loads((path / COMPLETE).read_text())
    p, exclude = cfg.parallel, cfg.checkpoint.exclude_from_loading
    saved_shape = meta.get("model")  # absent from checkpoints of older versions
    if saved_shape is not None:
        mine = model_shape(cfg)
        diff = [
            f"model.{k}: checkpoint {v!r}, this run {mine.get(k)!r}"
            for k, v in saved_shape.items()
            if mine.get(k) != v
        ]
        if diff:
            # No override: weights of another shape cannot be loaded, whatever is excluded.
            raise CheckpointError(
                f"checkpoint {path} holds a model of another shape ({'; '.join(diff)}): set "
                f"those values back to resume it, or train the new shape as a new run "
                f"(another run.name, or run.resume=never)"
            )
    if (meta["tp"], meta["pp"]) != (p.tp, p.pp):
        raise CheckpointError(
            f"checkpoint {path} was saved with tp={meta['tp']}, pp={meta['pp']}; this run has "
            f"tp={p.tp}, pp={p.pp}: resume with the same model-parallel layout"
        )
    stage = meta.get("zero_stage", 0)
    if (stage == 3) != (p.zero_stage == 3):
        # ZeRO-3 keeps the weights in per-rank shard files, the other stages in whole files:
        # DeepSpeed cannot load one into the other even with the optimizer state excluded.
        raise CheckpointError(
            f"checkpoint {path} was saved with ZeRO stage {stage}, this run uses "
            f"parallel.zero_stage={p.zero_stage}: the weights of ZeRO-3 and of stages 0-2 are "
            f"stored differently, so resume at parallel.zero_stage={stage}"
            + (" (or 3)" if stage != 3 else "")
        )
    # bf16 at ZeRO-0 (older versions allowed it) keeps DP-sharded optimizer state like ZeRO-1,
    # in *optim_states.pt files; older checkpoints do not record their precision, the files do.
    saved_precision = meta.get("precision")
    sharded_optimizer = stage > 0 or saved_precision == "bf16" or any(path.glob("*optim_states.pt"))
    kind = f"ZeRO-{stage}" + (" bf16" if saved_precision == "bf16" else "")
    if stage == 3 and meta["dp"] != dp:
        raise CheckpointError(
            f"checkpoint {path} holds ZeRO-3 weight shards of {meta['dp']} data-parallel ranks; "
            f"this run has {dp}: launch {meta['world_size']} processes to resume it"
        )
    if "optimizer" not in exclude:
        if stage != p.zero_stage:
            raise CheckpointError(
                f"checkpoint {path} was saved with ZeRO stage {stage}, this run uses "
                f"parallel.zero_stage={p.zero_stage}: use the same stage, or add 'optimizer' to "
                f"checkpoint.exclude_from_loading to start the optimizer state afresh"
            )
        if saved_precision is not None and saved_precision != cfg.run.precision:
            raise CheckpointError(
                f"checkpoint {path} was saved with run.precision={saved_precision}, this run "
                f"uses {cfg.run.precision}: their optimizer states differ; use "
                f"run.precision={saved_precision}, or add 'optimizer' to "
                f"checkpoint.exclude_from_loading to start the optimizer state afresh"
            )
        if sharded_optimizer and meta["dp"] != dp:
            raise CheckpointError(
                f"checkpoint {path} holds {kind} optimizer shards of {meta['dp']} "
                f"data-parallel ranks; this run has {dp}: launch {meta['world_size']} processes, "
                f"or add 'optimizer' to checkpoint.exclude_from_loading"
            )
    saved = meta.get("data") or {}
    if "data" not in exclude and saved:
        # data_identity: the state_dict() of the loader this run will build, less its position.
        for key, saved_value in saved.items():
            if data_identity.get(key) != saved_value:
                raise CheckpointError(
                    f"checkpoint {path} was trained on data with {key} {saved_value!r}, this "
                    f"run's is {data_identity.get(key)!r}: resume with the same data and "
                    f"settings, or add 'data' to checkpoint.exclude_from_loading to start the "
                    f"data afresh"
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
    names = [None]
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


def load(engine: Any, layout: Layout, path: Path, exclude: list[str]) -> tuple[dict, dict | None]:
    """Load a complete checkpoint into the engine. Returns (client_state, this rank's state or
    None when the checkpoint has no file for this rank, e.g. it was saved by fewer ranks)."""
    verify(path, layout)
    meta = json.loads((path / COMPLETE).read_text())
    if meta["tp"] != layout.tp_size or meta["pp"] != layout.pp_size:
        raise CheckpointError(
            f"checkpoint {path} was saved with tp={meta['tp']}, pp={meta['pp']}; this run has "
            f"tp={layout.tp_size}, pp={layout.pp_size}: resume with the same model-parallel "
            f"layout"
        )
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
    rank_file = path / f"rank_{layout.rank:05d}.pt"
    rank_state = torch.load(rank_file, weights_only=False) if rank_file.is_file() else None
    return client_state, rank_state
