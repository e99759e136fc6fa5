"""Checkpoint bookkeeping that needs no engine: which checkpoint a run resumes from, whether it
is compatible with the run, and which old ones are pruned. Saving and loading through DeepSpeed
is covered by tests/distributed/test_training.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pretrain.checkpoint import (
    ABANDONED,
    COMPLETE,
    MANIFEST,
    _prune,
    check_compatible,
    complete_checkpoints,
    model_shape,
    resolve_resume,
    start_branch,
    step_of,
    tag_for,
    verify_files,
)
from pretrain.config import load_config
from pretrain.errors import CheckpointError

FINGERPRINT = "f" * 64
# What the run's train loader reports (its state_dict less the position).
IDENTITY = {"fingerprint": FINGERPRINT, "seq_len": 32, "shuffle_run": 1}


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
        ({"data": {"fingerprint": "0" * 64, "seq_len": 32}}, (), 2, "fingerprint"),
        ({"data": {"fingerprint": FINGERPRINT, "seq_len": 64}}, (), 2, "seq_len"),
        # Another layout needs the split dimensions recorded at save time (not by old versions).
        ({"tp": 2}, (), 2, "older version"),
        # A pipeline checkpoint at ZeRO-0: its optimizer files do not name their tensors.
        ({"pp": 2, "zero_stage": 0, "tp_dims": {}}, (), 2, "pp=2.*ZeRO stage 0"),
    ],
)
def test_incompatible_checkpoint_is_refused(tmp_path, meta, overrides, dp, message):
    path = fake_checkpoint(tmp_path, 10, **meta)
    with pytest.raises(CheckpointError, match=message):
        check_compatible(path, cfg(*overrides), IDENTITY, dp=dp)


@pytest.mark.parametrize(
    "meta, overrides, dp, changes",
    [
        ({}, (), 2, []),  # the same layout: DeepSpeed loads it as saved
        ({"tp": 2}, (), 2, ["tp 2 -> 1"]),
        ({"zero_stage": 0}, (), 2, ["ZeRO stage 0 -> 1"]),
        ({}, (), 4, ["dp 2 -> 4"]),  # ZeRO-1 optimizer shards belong to the saved DP size
        ({"zero_stage": 3}, ("parallel.zero_stage=3",), 4, ["dp 2 -> 4"]),
        ({"zero_stage": 0}, ("parallel.zero_stage=0",), 4, []),  # ZeRO-0 fp32 holds all
        ({"zero_stage": 3}, (), 2, ["ZeRO stage 3 -> 1"]),
        ({"precision": "fp32"}, ("run.precision=bf16",), 2, ["precision fp32 -> bf16"]),
        # bf16 shards its optimizer state over DP even at ZeRO-0 (older versions allowed it).
        (
            {"zero_stage": 0, "precision": "bf16"},
            ("parallel.zero_stage=0", "run.precision=fp32"),
            4,
            ["precision bf16 -> fp32", "dp 2 -> 4"],
        ),
        # One data-parallel rank: ZeRO-1 in fp32 runs (and saves) as stage 0, so its own
        # checkpoints load as saved, older versions' real ZeRO-1 ones are resharded, and so is
        # a move to more ranks; bf16 keeps its stage.
        ({"dp": 1, "world_size": 1, "zero_stage": 0}, (), 1, []),
        ({"dp": 1, "world_size": 1}, (), 1, ["ZeRO stage 1 -> 0"]),
        ({"dp": 1, "world_size": 1, "zero_stage": 0}, (), 2, ["ZeRO stage 0 -> 1"]),
        ({"dp": 1, "world_size": 1, "precision": "bf16"}, ("run.precision=bf16",), 1, []),
    ],
)
def test_layout_changes_are_resharded(tmp_path, meta, overrides, dp, changes):
    path = fake_checkpoint(tmp_path, 10, tp_dims={}, **meta)
    assert check_compatible(path, cfg(*overrides), IDENTITY, dp=dp) == changes


def test_a_checkpoint_from_before_shuffle_runs_counts_as_run_1(tmp_path):
    """A checkpoint saved before data.shuffle_run existed records no shuffle_run: its data
    order shuffled single sequences, so a run-4 resume is refused before any process group
    (not later, by the loader, inside the ranks) and a run-1 resume passes."""
    path = fake_checkpoint(tmp_path, 10)  # data: fingerprint and seq_len only
    check_compatible(path, cfg(), IDENTITY, dp=2)
    with pytest.raises(CheckpointError, match="shuffle_run 1, this run's is 4"):
        check_compatible(path, cfg(), {**IDENTITY, "shuffle_run": 4}, dp=2)


def test_excluding_the_data_allows_other_data(tmp_path):
    path = fake_checkpoint(tmp_path, 10, data={"fingerprint": "0" * 64, "seq_len": 32})
    check_compatible(path, cfg("checkpoint.exclude_from_loading=[data]"), IDENTITY, 2)


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


# --- lineage, integrity and the new refusals ----------------------------------------------


def test_auto_follows_latest_not_the_highest_step(tmp_path):
    fake_checkpoint(tmp_path, 10)
    fifteen = fake_checkpoint(tmp_path, 15)
    fake_checkpoint(tmp_path, 20)  # a higher step that `latest` does not name
    (tmp_path / "latest").write_text(tag_for(15))
    assert resolve_resume("auto", tmp_path) == fifteen
    (tmp_path / "latest").write_text(tag_for(30))  # names nothing complete
    with pytest.raises(CheckpointError, match="step_00000030.*not a complete checkpoint"):
        resolve_resume("auto", tmp_path)


def test_rollback_moves_newer_checkpoints_aside_and_repoints_latest(tmp_path):
    ten = fake_checkpoint(tmp_path, 10)
    for step in (20, 30):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "latest").write_text(tag_for(30))
    line = start_branch(tmp_path, ten)
    assert "step_00000020, step_00000030" in line
    assert (tmp_path / "latest").read_text() == tag_for(10)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [tag_for(10)]
    moved = sorted(p.name for p in (tmp_path / ABANDONED).glob("*/step_*"))
    assert moved == [tag_for(20), tag_for(30)]
    # Continuing `latest` moves nothing.
    assert start_branch(tmp_path, ten) is None
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [tag_for(10)]


def test_branch_from_another_directory_moves_every_checkpoint_aside(tmp_path):
    other = fake_checkpoint(tmp_path / "other", 50)
    fake_checkpoint(tmp_path / "mine", 10)
    (tmp_path / "mine" / "latest").write_text(tag_for(10))
    assert start_branch(tmp_path / "mine", other) is not None
    assert not list((tmp_path / "mine").glob("step_*"))
    assert not (tmp_path / "mine" / "latest").exists()


def test_prune_keeps_every_mth_step(tmp_path):
    for step in range(10, 110, 10):
        fake_checkpoint(tmp_path, step)
    _prune(tmp_path, keep_last=2, keep_every=30)
    left = sorted(step_of(p) for p in complete_checkpoints(tmp_path))
    assert left == [30, 60, 90, 100]


def test_verify_files_names_a_changed_or_missing_file(tmp_path):
    path = fake_checkpoint(tmp_path, 10)
    shard = path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(bytes(range(256)) * 4)
    sums = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in path.glob("*.pt")}
    (path / MANIFEST).write_text("".join(f"{h}  {n}\n" for n, h in sums.items()))
    assert verify_files(path) == []
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x10
    shard.write_bytes(bytes(data))
    assert verify_files(path) == [f"{shard} does not match its checksum in {MANIFEST}"]
    (path / "mp_rank_00_model_states.pt").unlink()
    assert f"{path / 'mp_rank_00_model_states.pt'} is missing" in verify_files(path)
    # Each rank checks only its share; together they cover every file.
    shares = [verify_files(path, r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(verify_files(path))


SHAPE = {
    "family": "gpt",
    "n_layers": 4,
    "n_decoder_layers": 4,
    "d_model": 128,
    "n_heads": 4,
    "n_kv_heads": 4,
    "ffn_hidden": 512,
    "vocab_size": 512,
    "activation": "gelu",
    "positions": "learned",
    "norm": "layernorm",
    "bias": True,
    "tie_embeddings": True,
}


@pytest.mark.parametrize(
    "meta, overrides, dp, message",
    [
        (
            {"model": SHAPE},
            ("model.d_model=256",),
            2,
            "model.d_model: checkpoint 128, this run 256",
        ),
        ({"model": SHAPE}, ("model.n_layers=6",), 2, "model.n_layers: checkpoint 4, this run 6"),
        # A padding change needs the tokenizer's size, which older versions did not record.
        (
            {"model": SHAPE, "tp_dims": {}},
            ("model.vocab_size=576",),
            2,
            "512 vocabulary rows, this run pads to 576",
        ),
    ],
)
def test_more_incompatible_checkpoints_are_refused(tmp_path, meta, overrides, dp, message):
    path = fake_checkpoint(tmp_path, 10, **meta)
    # No override helps: weights of another shape cannot be loaded.
    for exclude in ("[]", "[optimizer]"):
        config = cfg(
            "model.vocab_size=512", *overrides, f"checkpoint.exclude_from_loading={exclude}"
        )
        with pytest.raises(CheckpointError, match=message):
            check_compatible(path, config, IDENTITY, dp=dp)


def test_the_same_shape_passes(tmp_path):
    shape = model_shape(cfg("model.vocab_size=512"))
    check_compatible(
        fake_checkpoint(tmp_path, 10, model=shape), cfg("model.vocab_size=512"), IDENTITY, 2
    )
