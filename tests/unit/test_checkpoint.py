"""Checkpoint bookkeeping that needs no engine: which checkpoint a run resumes from, whether it
is compatible with the run, and which old ones are pruned. Saving and loading through DeepSpeed
is covered by tests/distributed/test_training.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.checkpoint import (
    COMPLETE,
    _prune,
    check_compatible,
    complete_checkpoints,
    resolve_resume,
    tag_for,
)
from pretrain.config import load_config
from pretrain.errors import CheckpointError

FINGERPRINT = "f" * 64
# What the run's train loader reports (its state_dict less the position).
IDENTITY = {"fingerprint": FINGERPRINT, "seq_len": 32}


def fake_checkpoint(ckpt_dir: Path, step: int, complete: bool = True, **meta) -> Path:
    path = ckpt_dir / tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"")
    if complete:
        info = {
            "step": step,
            "world_size": 2,
            "dp": 2,
            "tp": 1,
            "pp": 1,
            "zero_stage": 1,
            "data": {"fingerprint": FINGERPRINT, "seq_len": 32},
        }
        info.update(meta)
        (path / COMPLETE).write_text(json.dumps(info))
    return path


def cfg(*overrides: str):
    return load_config(None, ["model.seq_len=32", "parallel.zero_stage=1", *overrides])


def test_auto_takes_the_newest_complete_checkpoint(tmp_path):
    assert resolve_resume("auto", tmp_path) is None  # nothing yet: a fresh start
    fake_checkpoint(tmp_path, 10)
    newest = fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 30, complete=False)  # an interrupted save is never resumed
    assert resolve_resume("auto", tmp_path) == newest
    assert [p.name for p in complete_checkpoints(tmp_path)] == [tag_for(10), tag_for(20)]


def test_never_refuses_a_directory_with_checkpoints(tmp_path):
    assert resolve_resume("never", tmp_path) is None
    fake_checkpoint(tmp_path, 10)
    with pytest.raises(CheckpointError, match="run.resume=auto"):
        resolve_resume("never", tmp_path)


def test_explicit_paths(tmp_path):
    ten = fake_checkpoint(tmp_path, 10)
    broken = fake_checkpoint(tmp_path, 20, complete=False)
    assert resolve_resume(str(ten), tmp_path) == ten
    assert resolve_resume(str(tmp_path), tmp_path / "other") == ten  # a checkpoints directory
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(str(broken), tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "step_00000099"), tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume(str(empty), tmp_path)


def test_compatible_checkpoint_passes(tmp_path):
    check_compatible(fake_checkpoint(tmp_path, 10), cfg(), IDENTITY, dp=2)


@pytest.mark.parametrize(
    "meta, overrides, dp, message",
    [
        ({"tp": 2}, (), 2, "tp=2"),
        ({"zero_stage": 0}, (), 2, "ZeRO stage 0"),
        ({}, (), 4, "optimizer shards of 2"),
        ({"zero_stage": 3}, ("parallel.zero_stage=3",), 4, "ZeRO-3 weight shards"),
        ({"data": {"fingerprint": "0" * 64, "seq_len": 32}}, (), 2, "fingerprint"),
        ({"data": {"fingerprint": FINGERPRINT, "seq_len": 64}}, (), 2, "seq_len"),
    ],
)
def test_incompatible_checkpoint_is_refused(tmp_path, meta, overrides, dp, message):
    path = fake_checkpoint(tmp_path, 10, **meta)
    with pytest.raises(CheckpointError, match=message):
        check_compatible(path, cfg(*overrides), IDENTITY, dp=dp)


@pytest.mark.parametrize(
    "meta, exclude, dp",
    [
        ({"zero_stage": 0}, "[optimizer]", 2),  # a fresh optimizer at another stage
        ({}, "[optimizer]", 4),  # another dp size, ZeRO-1 weights are whole
        ({"data": {"fingerprint": "0" * 64, "seq_len": 32}}, "[data]", 2),  # new data
    ],
)
def test_excluding_the_part_allows_the_change(tmp_path, meta, exclude, dp):
    path = fake_checkpoint(tmp_path, 10, **meta)
    check_compatible(path, cfg(f"checkpoint.exclude_from_loading={exclude}"), IDENTITY, dp)


def test_prune_keeps_the_newest_and_drops_stale_partial_saves(tmp_path):
    for step in (10, 20, 30, 40):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 35, complete=False)  # older than the newest complete one
    fake_checkpoint(tmp_path, 50, complete=False)  # maybe being written right now
    _prune(tmp_path, keep_last=2)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [tag_for(30), tag_for(40), tag_for(50)]
    _prune(tmp_path, keep_last=0)  # 0 keeps every complete checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == left
