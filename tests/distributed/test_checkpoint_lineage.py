"""Checkpoint lineage, crash safety and integrity, through torchrun and the real entry point
(two gloo ranks, ZeRO 1, dropout on so a resume also needs every rank's RNG state).

One module-scoped fixture runs one run directory, `lin`, through six launches:

  L1 full      20 steps, checkpoints at 10 and 20                          (reference)
  L2 rollback  run.resume=<step 10> into the same directory, preempted after 5 steps (saves 15)
  L3 crash     run.resume=auto; rank 1 SIGKILLs itself in the middle of saving step 20
  L4 recover   run.resume=auto again: continues the new branch from 15 to 20
  L5 finished  run.resume=auto on the finished run: nothing to train, nothing rewritten
  L6 damaged   run.resume=auto after one byte of a shard was flipped: refused, file named

Between launches the fixture records what the tests compare (file digests, listings).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import launching
import pytest

pytestmark = pytest.mark.slow

COMMON = [
    "run.train_steps=20",
    "run.log_interval=5",
    "run.eval_interval=0",
    "run.sample_tokens=0",
    "model.dropout=0.1",
    "parallel.zero_stage=1",
    "checkpoint.interval=10",
    "checkpoint.keep_last=2",
    "optim.warmup_steps=4",
    "tracking.enabled=false",
]
TAG = "step_{:08d}".format


def listing(ckpts: Path) -> list[str]:
    """The checkpoint directory's entries, less DeepSpeed's zero_to_*.py helper scripts."""
    return sorted(p.name for p in ckpts.iterdir() if not p.name.startswith("zero_to_"))


def digests(root: Path) -> dict[str, tuple[str, int]]:
    """{relative file: (sha256, mtime_ns)} of every file under root."""
    out = {}
    for f in sorted(root.rglob("*")):
        if f.is_file():
            out[str(f.relative_to(root))] = (
                hashlib.sha256(f.read_bytes()).hexdigest(),
                f.stat().st_mtime_ns,
            )
    return out


def start(tmp: Path, label: str, data: str, *overrides: str, env=None, check=True):
    """Launch run `lin` (2 ranks); returns (records or None, the launch's output)."""
    out = tmp / f"{label}.json"
    args = [
        str(out),
        str(launching.ROOT / "configs/tiny.yaml"),
        f"data.path={data}",
        f"run.output_dir={tmp / 'runs'}",
        "run.name=lin",
        *COMMON,
        *overrides,
    ]
    proc = launching.torchrun(launching.WORKER, args, 2, tmp / f"{label}.log", env=env, check=check)
    records = json.loads(out.read_text()) if out.is_file() else None
    return records, proc


@pytest.fixture(scope="module")
def lin(tmp_path_factory, small_dataset):
    tmp = tmp_path_factory.mktemp("lineage")
    ckpts = tmp / "runs" / "lin" / "checkpoints"
    r: dict = {"ckpts": ckpts}
    r["full"], _ = start(tmp, "full", small_dataset)
    r["step20_before"] = digests(ckpts / TAG(20))
    r["rollback"], _ = start(
        tmp, "rollback", small_dataset, f"run.resume={ckpts / TAG(10)}", "run.exit_after_steps=5"
    )
    r["after_rollback"] = listing(ckpts)
    r["crash"], r["crash_proc"] = start(
        tmp,
        "crash",
        small_dataset,
        env={"PRETRAIN_TEST_KILL_IN_SAVE": "20:1"},
        check=False,
    )
    r["after_crash"] = listing(ckpts)
    r["latest_after_crash"] = (ckpts / "latest").read_text()
    from pretrain.checkpoint import resolve_resume

    r["auto_after_crash"] = resolve_resume("auto", ckpts)
    r["recover"], r["recover_proc"] = start(tmp, "recover", small_dataset)
    r["live_before_finished"] = digests(ckpts / TAG(20))
    r["latest_before_finished"] = (ckpts / "latest").read_text()
    r["finished"], r["finished_proc"] = start(tmp, "finished", small_dataset)
    r["live_after_finished"] = digests(ckpts / TAG(20))
    # Flip one byte in the middle of the live step-20 weights file, then resume.
    shard = ckpts / TAG(20) / "mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    r["damaged_shard"] = shard
    r["damaged"], r["damaged_proc"] = start(tmp, "damaged", small_dataset, check=False)
    return r


def test_rollback_then_preempt_resumes_the_new_branch(lin):
    full, rollback, recover = lin["full"][0], lin["rollback"][0], lin["recover"][0]
    assert full["step"] == 20 and rollback["step"] == 15 and recover["step"] == 20
    # The branch from step 10 replays the same data and RNG: its steps 11-15 are the full
    # run's, and the relaunch continued from the branch's 15, not the abandoned 20 (which
    # would have trained nothing).
    assert rollback["losses"] == full["losses"][10:15]
    assert recover["losses"] == full["losses"][15:20]
    assert recover["digest"] == full["digest"]
    assert f"resumed from {lin['ckpts'] / TAG(15)} at step 15" in lin["recover_proc"].stdout


def test_abandoned_branch_is_kept_aside_not_pruned(lin):
    ckpts = lin["ckpts"]
    # After the rollback the live lineage is 10 -> 15; the old 20 is out of the way.
    assert lin["after_rollback"] == ["abandoned", "latest", TAG(10), TAG(15)]
    moved = list((ckpts / "abandoned").glob(f"*-from-{TAG(10)}/{TAG(20)}"))
    assert len(moved) == 1
    assert digests(moved[0]) == lin["step20_before"]  # byte for byte, never rewritten


def test_crash_mid_save_leaves_the_previous_checkpoint_as_resume_point(lin):
    assert lin["crash_proc"].returncode != 0 and lin["crash"] is None
    assert "resumed from" in lin["crash_proc"].stdout  # it trained, then died in the save
    # No step_20 appeared; only the hidden work directory of the interrupted save.
    assert lin["latest_after_crash"] == TAG(15)
    assert TAG(20) not in lin["after_crash"]
    assert f".saving-{TAG(20)}" in lin["after_crash"]
    assert lin["auto_after_crash"] == lin["ckpts"] / TAG(15)
    # The next launch resumed 15 and trained on exactly; its save cleared the leftovers.
    assert lin["recover"][0]["losses"] == lin["full"][0]["losses"][15:]
    assert not list(lin["ckpts"].glob(".saving-*"))


def test_relaunched_finished_run_leaves_its_checkpoint_untouched(lin):
    finished = lin["finished"][0]
    assert finished["step"] == 20 and finished["losses"] == []
    assert lin["live_after_finished"] == lin["live_before_finished"]  # bytes and mtimes
    assert (lin["ckpts"] / "latest").read_text() == lin["latest_before_finished"] == TAG(20)
    manifest = (lin["ckpts"] / TAG(20) / "MANIFEST.sha256").read_text()
    assert "mp_rank_00_model_states.pt" in manifest and "rank_00001.pt" in manifest


def test_flipped_byte_is_refused_naming_the_file(lin):
    proc = lin["damaged_proc"]
    assert proc.returncode != 0 and lin["damaged"] is None
    assert f"error: checkpoint {lin['ckpts'] / TAG(20)} is damaged" in proc.stderr
    assert f"{lin['damaged_shard']} does not match its checksum" in proc.stderr
    # One line from rank 0 and no rank's traceback (torchrun adds its own summary).
    assert proc.stderr.count("is damaged") == 1 and "]: Traceback" not in proc.stderr


# --- refusals before any process group, on the real checkpoint of L1-L4 ---------------------


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory):
    """Other data than small_dataset (a different file subset): another fingerprint."""
    from data_pipeline.build import build
    from data_pipeline.sources import stdlib_sources

    files = [str(p) for p in stdlib_sources() if "/json/" in str(p) or "/email/" in str(p)]
    out = tmp_path_factory.mktemp("data") / "other"
    build(files, out, vocab_size=512, shard_tokens=20_000, val_fraction=0.1, seed=0, progress=False)
    return str(out)


def refusal(lin, data: str, *overrides: str, resume: Path | None = None) -> str:
    """Run the entry point in this process against lin's checkpoint; the refusal's message,
    or '' when it passes the pre-flight check (it must still have no process group)."""

    from pretrain.errors import CheckpointError
    from pretrain.train import prepare

    root = launching.ROOT
    argv = [
        str(root / "configs/tiny.yaml"),
        f"data.path={data}",
        f"run.output_dir={lin['ckpts'].parents[2] / 'other_runs'}",
        f"run.resume={resume or lin['ckpts'] / TAG(15)}",
        *COMMON,
        *overrides,
    ]
    prev = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "2"  # the checkpoint's data-parallel size
    try:
        prepare(argv)
        message = ""
    except CheckpointError as e:
        message = str(e)
    finally:
        os.environ.pop("WORLD_SIZE")
        if prev is not None:
            os.environ["WORLD_SIZE"] = prev
    return message


@pytest.mark.parametrize(
    "overrides, named",
    [
        (("model.d_model=128",), "model.d_model: checkpoint 64, this run 128"),
        (("model.n_layers=3",), "model.n_layers: checkpoint 2, this run 3"),
    ],
)
def test_incompatible_resume_is_refused_before_any_process_group(
    lin, small_dataset, overrides, named, group_starts
):
    assert refusal(lin, small_dataset) == ""  # the unchanged run passes: not vacuous
    message = refusal(lin, small_dataset, *overrides)
    assert named in message
    # No override helps: weights of another shape cannot be loaded.
    excluded = "checkpoint.exclude_from_loading=[optimizer]"
    assert named in refusal(lin, small_dataset, *overrides, excluded)
    assert group_starts == []  # prepare() never tried to start one


@pytest.mark.parametrize(
    "overrides",
    [("parallel.zero_stage=3",), ("run.precision=bf16",), ("model.vocab_size=1024",)],
)
def test_another_layout_is_consolidated_before_any_process_group(
    lin, small_dataset, overrides, group_starts, tmp_path
):
    """A layout the checkpoint was not saved with (ZeRO stage, precision, vocabulary padding)
    passes the pre-flight check, and prepare() consolidates the checkpoint for resharding
    (tests/distributed/test_reshard.py loads such copies) without starting a process group.
    On a copy: the lineage tests keep comparing the original's bytes."""
    copy = tmp_path / "checkpoints" / TAG(15)
    shutil.copytree(lin["ckpts"] / TAG(15), copy)
    assert refusal(lin, small_dataset, *overrides, resume=copy) == ""
    assert (copy / "universal" / "COMPLETE").is_file()
    assert group_starts == []


def test_other_data_is_refused_unless_excluded(lin, other_dataset):
    message = refusal(lin, other_dataset)
    assert "fingerprint" in message
    assert refusal(lin, other_dataset, "checkpoint.exclude_from_loading=[data]") == ""
