"""Sharded checkpoints: save, find the latest complete one, load, keep the newest K.

A checkpoint is a DeepSpeed checkpoint directory `checkpoints/step_00000100/` (model and
optimizer shards as DeepSpeed lays them out for the ZeRO stage) plus:

- client state in DeepSpeed's model-state file: step, consumed tokens, data-loader position and
  fingerprint, MLflow run id, the resolved config and the parallel layout;
- `rank_00000.pt`, ... : each rank's RNG states (they differ per rank, DeepSpeed saves one copy);
- `COMPLETE`: written by rank 0 after every rank has finished writing. A directory without it
  is an interrupted save and is never resumed from.

The `latest` file beside the step directories names the newest complete tag, in DeepSpeed's
format, so DeepSpeed's own tools (zero_to_fp32) work on our checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
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


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.name.startswith(PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


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
        found = complete_checkpoints(ckpt_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(
            f"run.resume={resume!r}: no such checkpoint; pass a step directory "
            f"like {ckpt_dir / tag_for(100)} or use run.resume=auto"
        )
    if not path.name.startswith(PREFIX):  # a checkpoints directory: take its newest
        found = complete_checkpoints(path)
        if not found:
            raise CheckpointError(f"run.resume={resume!r} holds no complete checkpoint")
        return found[-1]
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
    if (meta["tp"], meta["pp"]) != (p.tp, p.pp):
        raise CheckpointError(
            f"checkpoint {path} was saved with tp={meta['tp']}, pp={meta['pp']}; this run has "
            f"tp={p.tp}, pp={p.pp}: resume with the same model-parallel layout"
        )
    stage = meta.get("zero_stage", 0)
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
        if stage > 0 and meta["dp"] != dp:
            raise CheckpointError(
                f"checkpoint {path} holds ZeRO-{stage} optimizer shards of {meta['dp']} "
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
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    tag = tag_for(step)
    path = ckpt_dir / tag
    if layout.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if path.exists():  # a save of this step interrupted earlier, or an identical one
            shutil.rmtree(path)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rank_state, path / f"rank_{layout.rank:05d}.pt")
    dist.barrier()  # every shard is on disk before the marker says so
    if layout.is_main:
        meta = {
            "step": step,
            "world_size": layout.world_size,
            "dp": layout.dp_size,
            "tp": layout.tp_size,
            "pp": layout.pp_size,
            "zero_stage": engine.zero_optimization_stage(),
            "data": {k: v for k, v in client_state["data"].items() if k != "consumed"},
            "time": time.time(),
        }
        _write_atomic(path / COMPLETE, json.dumps(meta))
        _write_atomic(ckpt_dir / "latest", tag)
        _prune(ckpt_dir, keep_last)
    dist.barrier()
    return path


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    complete = complete_checkpoints(ckpt_dir)
    doomed = complete[:-keep_last] if keep_last else []
    newest = int(complete[-1].name[len(PREFIX) :]) if complete else -1
    # Interrupted saves older than the newest complete one can never be resumed from.
    doomed += [
        p
        for p in ckpt_dir.iterdir()
        if p.name.startswith(PREFIX) and not is_complete(p) and int(p.name[len(PREFIX) :]) < newest
    ]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)


def load(engine: Any, layout: Layout, path: Path, exclude: list[str]) -> tuple[dict, dict | None]:
    """Load a complete checkpoint into the engine. Returns (client_state, this rank's state or
    None when the checkpoint has no file for this rank, e.g. it was saved by fewer ranks)."""
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
