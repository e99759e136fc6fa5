"""Faults handled by every rank together, each proven by injecting it (reliability.inject) into
two-process gloo runs (docs/reliability.md).

Launches (each pays seconds of imports, so most runs share one):
  term      16-step run, SIGTERM to rank 1 at step 12, 2 loader workers: saves, exits 0
  worker    one launch, in order: ref (the uninterrupted 16-step run, no loader workers),
            term_resumed (term continued to 16), skip / stop / stop_resumed (NaN on rank 1 at
            step 7), kskips (3 NaN steps in a row), spike (100x loss at step 30, skipped),
            rollback (the same spike, rolled back to step 20), late / late_alone (SIGTERM
            during rank 0's step 5 forward pass, with and without rank 1's before the step),
            seed (a new seed: the negative control of the determinism checks)
  sigstop   rank 1 stopped (SIGSTOP) at step 4 with 10 s collective timeouts
  sigkill   rank 1 killed (SIGKILL) at step 4
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import launching
import pytest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("reliability_worker.py")
CONFIG = launching.ROOT / "configs" / "tiny.yaml"
STEPS = 16


def common(tmp: Path, data: str, name: str, steps: int = STEPS) -> list[str]:
    return [
        str(CONFIG),
        f"data.path={data}",
        f"run.output_dir={tmp / 'runs'}",
        f"run.name={name}",
        f"run.train_steps={steps}",
        "run.eval_batches=0",
        "run.eval_interval=0",
        "run.log_interval=4",
        "model.dropout=0.1",  # the masks must be replayed exactly, too
        "optim.warmup_steps=4",
        "tracking.enabled=false",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_dataset):
    tmp = tmp_path_factory.mktemp("reliability")
    data = small_dataset
    r = {"tmp": tmp}
    t0 = time.monotonic()
    term = launching.torchrun(
        launching.WORKER,
        [str(tmp / "term.json"), *common(tmp, data, "term")]
        + ["data.num_workers=2", "reliability.inject=[sigterm@12:1]"],
        2,
        tmp / "term.log",
    )
    r["term_rc"], r["term_s"] = term.returncode, time.monotonic() - t0
    r["term"] = json.loads((tmp / "term.json").read_text())
    nan7 = ["reliability.inject=[nan@7:1]"]
    ten = "run.exit_after_steps=10"
    scenarios = [
        ("ref", common(tmp, data, "ref")),
        ("term_resumed", common(tmp, data, "term")),
        # The reference's schedule (16 steps), stopped early by run.exit_after_steps.
        ("skip", common(tmp, data, "skip") + nan7 + ["reliability.nonfinite=skip", ten]),
        ("stop", common(tmp, data, "stop") + nan7 + ["reliability.nonfinite=stop"]),
        ("stop_resumed", common(tmp, data, "stop") + ["run.exit_after_steps=4"]),
        (
            "kskips",
            common(tmp, data, "kskips", 10)
            + [
                "reliability.inject=[nan@3:1,nan@4:0,nan@5:1]",
                "reliability.nonfinite=skip",
                "reliability.max_consecutive_skips=3",
            ],
        ),
        (
            "spike",
            common(tmp, data, "spike", 32)
            + [
                "reliability.inject=[spike@30:1]",
                "reliability.spike_action=skip",
                "reliability.spike_window=20",
            ],
        ),
        (
            "rollback",
            common(tmp, data, "rollback", 32)
            + [
                "reliability.inject=[spike@30:1]",
                "reliability.spike_action=rollback",
                "reliability.spike_window=20",
                # After the rollback the new batches move the gradient norm by ~13 sigma of
                # the 20-step window (a second, genuine rollback at 6); the injected 100x loss
                # is hundreds of sigma.
                "reliability.spike_sigma=20",
                "checkpoint.interval=10",
            ],
        ),
        # SIGTERM reaching the ranks moments apart: rank 1 before step 5's stop check, rank 0
        # during that step's forward pass, after its check; then rank 0 alone, late.
        (
            "late",
            common(tmp, data, "late", 8) + ["reliability.inject=[sigterm@5:1,late-sigterm@5:0]"],
        ),
        (
            "late_alone",
            common(tmp, data, "late_alone", 8) + ["reliability.inject=[late-sigterm@5:0]"],
        ),
        ("seed", common(tmp, data, "seed") + ["run.seed=99", "run.exit_after_steps=3"]),
    ]
    spec = tmp / "scenarios.json"
    spec.write_text(json.dumps([{"name": n, "overrides": o} for n, o in scenarios]))
    launching.torchrun(WORKER, [str(tmp / "worker.json"), str(spec)], 2, tmp / "worker.log")
    ranks = json.loads((tmp / "worker.json").read_text())
    r["ranks"] = ranks
    r["log"] = (tmp / "worker.log").read_text()
    return r


def by_step(record: dict) -> dict[int, dict]:
    return {t["step"]: t for t in record["trace"]}


def test_nan_on_one_rank_is_skipped_by_every_rank(runs):
    for rank in runs["ranks"]:
        ref, skip = by_step(rank["ref"]), rank["skip"]
        trace = skip["trace"]
        assert [t["step"] for t in trace] == list(range(1, 11))
        assert skip["skipped"] == [0.0] * 6 + [1.0] + [0.0] * 3
        assert math.isnan(skip["losses"][6])
        # Step 7's update discarded: weights, optimizer state and schedule as after step 6.
        assert trace[6]["weights"] == ref[6]["weights"] == trace[5]["weights"]
        assert trace[6]["optim"] == ref[6]["optim"]
        assert trace[6]["lr"] == trace[5]["lr"]
        # The run goes on, with finite losses and moving weights.
        assert all(math.isfinite(x) for x in skip["losses"][7:])
        assert trace[7]["weights"] != trace[6]["weights"]
        assert skip["step"] == 10 and skip["fault"] is None
    # Every rank holds the same weights.
    assert len({r["skip"]["trace"][-1]["weights"] for r in runs["ranks"]}) == 1


def test_nan_with_stop_saves_the_last_good_state(runs):
    for rank in runs["ranks"]:
        stop, resumed, ref = rank["stop"], rank["stop_resumed"], by_step(rank["ref"])
        assert stop["step"] == 6 and "non-finite" in stop["fault"]
        assert "step 6 is saved" in stop["fault"] and "run.resume=auto" in stop["fault"]
        # The saved state is step 6's exactly: resuming replays steps 7-10 of the clean run.
        assert resumed["losses"] == rank["ref"]["losses"][6:10]
        assert [t["weights"] for t in resumed["trace"]] == [ref[s]["weights"] for s in range(7, 11)]
    assert (runs["tmp"] / "runs" / "stop" / "checkpoints" / "step_00000006").is_dir()


def test_consecutive_skips_stop_with_advice(runs):
    for rank in runs["ranks"]:
        k = rank["kskips"]
        assert k["step"] == 5 and k["skipped"] == [0.0, 0.0, 1.0, 1.0, 1.0]
        assert "3 consecutive steps skipped" in k["fault"]
        assert "max_consecutive_skips" in k["fault"] and "optim.lr" in k["fault"]
        assert k["trace"][-1]["weights"] == k["trace"][1]["weights"]  # those of step 2
    assert (runs["tmp"] / "runs" / "kskips" / "checkpoints" / "step_00000005").is_dir()


def test_spike_at_step_30_is_detected_and_skipped(runs):
    for rank in runs["ranks"]:
        s = rank["spike"]
        assert [i + 1 for i, v in enumerate(s["skipped"]) if v] == [30]
        assert s["trace"][29]["weights"] == s["trace"][28]["weights"]
        assert s["trace"][30]["weights"] != s["trace"][29]["weights"]
    assert "step 30: loss spike at step 30" in runs["log"]


def test_spike_with_rollback_returns_to_the_last_checkpoint_past_the_batch(runs):
    for rank in runs["ranks"]:
        rb, spike = rank["rollback"], rank["spike"]
        steps = [t["step"] for t in rb["trace"]]
        # Step 30 spiked: back to the step-20 checkpoint, then steps 21-32 again.
        assert steps == list(range(1, 30)) + list(range(20, 33)), steps
        assert rb["trace"][29]["weights"] == rb["trace"][19]["weights"]
        assert rb["trace"][29]["optim"] == rb["trace"][19]["optim"]
        # The same run up to step 29 as the skip run; after the rollback the data is new
        # (sequences past batch 30), so the redone steps see other batches.
        assert rb["losses"][:29] == spike["losses"][:29]
        assert rb["losses"][30] != rb["losses"][20]
        assert rb["step"] == 32
    rollbacks = [x for x in runs["log"].splitlines() if "rolled back to" in x]
    assert len(rollbacks) == 1 and "step_00000020 (step 20)" in rollbacks[0], rollbacks


def test_sigterm_to_one_rank_saves_on_all_and_resume_is_bitwise(runs):
    assert runs["term_rc"] == 0
    assert [r["step"] for r in runs["term"]] == [12, 12]
    assert (runs["tmp"] / "runs" / "term" / "checkpoints" / "step_00000012").is_dir()
    for term, rank in zip(runs["term"], runs["ranks"], strict=True):
        # Determinism across launches and loader workers (2 there, 0 here) ...
        assert term["losses"] == rank["ref"]["losses"][:12]
        # ... and the resumed run continues the uninterrupted one bitwise.
        assert rank["term_resumed"]["losses"] == rank["ref"]["losses"][12:]
        assert rank["term_resumed"]["trace"][-1]["weights"] == rank["ref"]["trace"][-1]["weights"]


def test_a_signal_landing_mid_step_is_still_that_ranks_reason(runs):
    """A job's SIGTERM reaches rank 1 before step 5's stop check and rank 0 only during that
    step: both stop after step 5 (rank 1's flag is agreed in the step), and rank 0, the rank
    that prints the reason, names the signal, not 'another rank asked to stop'. Control: the
    late signal alone is seen only after the step, so the job stops one step later."""
    late = [rank["late"] for rank in runs["ranks"]]
    assert [r["step"] for r in late] == [5, 5]
    assert [r["stop_reason"] for r in late] == ["received SIGTERM", "received SIGTERM"]
    alone = [rank["late_alone"] for rank in runs["ranks"]]
    assert [r["step"] for r in alone] == [6, 6]
    assert [r["stop_reason"] for r in alone] == ["received SIGTERM", "another rank asked to stop"]


def test_a_new_seed_gives_other_losses(runs):
    for rank in runs["ranks"]:
        assert rank["seed"]["losses"] != rank["ref"]["losses"][:3]


def launch_fault(tmp: Path, data: str, name: str, fault: str) -> tuple[int, float, str]:
    """The real entry point (python -m pretrain.train) under torchrun with `fault` injected;
    (exit status, seconds, output)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "pretrain.train",
        *common(tmp, data, name, 8),
        f"reliability.inject=[{fault}]",
        "reliability.collective_timeout_s=10",
        "reliability.step_timeout_s=20",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(launching.ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    ended = time.monotonic()
    text = proc.stdout + proc.stderr
    (tmp / f"{name}.log").write_text(text)
    return proc.returncode, seconds_after_fault(text, ended), text


def seconds_after_fault(text: str, ended: float) -> float:
    """From the injected fault (its line gives the system-wide monotonic time) to `ended`."""
    line = next(x for x in text.splitlines() if "reliability.inject:" in x)
    return ended - float(line.rsplit("monotonic ", 1)[1])


def test_sigstop_of_one_rank_ends_every_process_with_the_message(tmp_path, small_dataset):
    rc, elapsed, text = launch_fault(tmp_path, small_dataset, "sigstop", "sigstop@4:1")
    assert rc != 0
    assert "rank 0: a collective failed after step 3" in text, text[-3000:]
    assert "killed stopped ranks [1]" in text
    assert not stray_processes(tmp_path)
    assert elapsed < 30, elapsed


def test_sigkill_of_one_rank_ends_the_others_with_a_message(tmp_path, small_dataset):
    rc, elapsed, text = launch_fault(tmp_path, small_dataset, "sigkill", "sigkill@4:1")
    assert rc != 0 and elapsed < 30, elapsed
    assert "rank 0: a collective failed after step 3" in text, text[-3000:]
    assert not stray_processes(tmp_path)


def stray_processes(tmp: Path) -> list[str]:
    """Processes still running with this test's directory on their command line."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(tmp) in line and "ps -eo" not in line]
