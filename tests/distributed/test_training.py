"""Two-process data-parallel training on gloo, through torchrun and the real entry point.

Launches are expensive (each process imports DeepSpeed and megatron-core), so one module-scoped
fixture runs them all once and the tests read their records:

  straight  20 steps, checkpoint every 10                     (reference)
  first     the same config, stops after 10 steps             (a preempted job)
  resumed   run.resume=auto on first's run directory, 10 more steps, in new processes
  no_data   resumes first's checkpoint without its data position     (negative control)
  new_lr    resumes first's checkpoint with a lower optim.lr: the config wins over the checkpoint
  zero0     ZeRO stage 0, no dropout, 10 steps                  (reference for the next two)
  zero3     ZeRO stage 3 with 2 micro-batches of gradient accumulation per step
  zero3_drop  zero3 with rank 0's first micro-batch gradient dropped        (negative control)

Dropout is on in the first four, so the resume also depends on every rank's RNG state being
restored; it is off in the last three, whose dropout masks would legitimately differ (a
micro-batch of 2 draws other masks than one of 4).
"""

from __future__ import annotations

import math
from pathlib import Path

import launching
import pytest

pytestmark = pytest.mark.slow

COMMON = [
    "run.train_steps=20",
    "run.log_interval=5",
    "run.eval_interval=10",
    "model.dropout=0.1",
    "parallel.zero_stage=1",
    "checkpoint.interval=10",
    "checkpoint.keep_last=5",
    "optim.warmup_steps=4",
    "optim.lr=3e-3",
]


EXTRA_MIB = 400  # rank 1 of `straight` holds this much more resident memory (worker.py)


def launch(tmp: Path, name: str, data: str, *overrides: str) -> list[dict]:
    return launching.launch(
        tmp, name, "configs/tiny.yaml", f"data.path={data}", *COMMON, *overrides
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_dataset):
    tmp = tmp_path_factory.mktemp("dist")
    r = {"tmp": tmp}
    r["straight"] = launching.launch(
        tmp,
        "straight",
        "configs/tiny.yaml",
        f"data.path={small_dataset}",
        *COMMON,
        env={"EXTRA_MEMORY": f"1:{EXTRA_MIB}"},
    )
    r["first"] = launch(tmp, "split", small_dataset, "run.exit_after_steps=10")
    r["resumed"] = launch(tmp, "split", small_dataset, "run.resume=auto")
    ckpt10 = tmp / "runs" / "split" / "checkpoints" / "step_00000010"
    r["no_data"] = launch(
        tmp,
        "no_data",
        small_dataset,
        f"run.resume={ckpt10}",
        "checkpoint.exclude_from_loading=[data]",
        "tracking.enabled=false",
    )
    r["new_lr"] = launch(
        tmp,
        "new_lr",
        small_dataset,
        f"run.resume={ckpt10}",
        "optim.lr=1e-3",
        "optim.min_lr=1e-4",
        "tracking.enabled=false",
    )
    ref = ("model.dropout=0.0", "run.exit_after_steps=10", "tracking.enabled=false")
    r["zero0"] = launch(tmp, "zero0", small_dataset, "parallel.zero_stage=0", *ref)
    r["zero3"] = launch(
        tmp,
        "zero3",
        small_dataset,
        "parallel.zero_stage=3",
        "parallel.micro_batch_size=2",
        "parallel.global_batch_size=8",
        *ref,
    )
    r["zero3_drop"] = launching.launch(
        tmp,
        "zero3_drop",
        "configs/tiny.yaml",
        f"data.path={small_dataset}",
        *COMMON,
        "parallel.zero_stage=3",
        "parallel.micro_batch_size=2",
        "parallel.global_batch_size=8",
        *ref,
        env={"DROP_MICRO_BATCH_GRADIENT": "1"},
    )
    return r


def test_ranks_end_with_identical_weights(runs):
    ranks = runs["straight"]
    assert len(ranks) == 2 and ranks[0]["step"] == 20
    assert ranks[0]["digest"] == ranks[1]["digest"]


def test_the_logged_loss_is_the_float32_mean_over_ranks(runs):
    """The step's loss travels in StepGuard's one all-reduce (no collective of its own): on
    every rank and step it equals, bitwise, what a float32 all-reduce of the ranks' loss sums
    over the data-parallel group gave, divided by micro-batches x ranks (numpy's float32 here).
    Control: the ranks' own losses differ, so a dropped reduction would show."""
    import numpy as np

    recs = runs["straight"]
    steps = len(recs[0]["losses"])
    assert steps == 20 and all(len(r["local_loss_sums"]) == steps for r in recs)
    own_differs = False
    for i in range(steps):
        sums = [r["local_loss_sums"][i][0] for r in recs]
        n_micro = recs[0]["local_loss_sums"][i][1]
        expected = float(np.float32(sums[0]) + np.float32(sums[1])) / (n_micro * len(recs))
        assert [r["losses"][i] for r in recs] == [expected] * len(recs), i
        own_differs |= sums[0] / n_micro != expected
    assert own_differs


def test_tiny_run_lowers_the_loss(runs):
    losses = runs["straight"][0]["losses"]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    # A fresh model sits near log(vocab) = log(512) = 6.24; 20 steps at lr 3e-3 on 160
    # sequences must take at least 0.5 nats off the mean of the last three steps (measured on
    # 2026-11-22: 6.22 -> 5.32, a drop of 0.90).
    start, end = losses[0], sum(losses[-3:]) / 3
    assert start > 5.5
    assert end < start - 0.5


def test_resume_is_bitwise_identical(runs):
    straight = runs["straight"][0]["losses"]
    first, resumed = runs["first"][0], runs["resumed"][0]
    assert first["step"] == 10 and resumed["step"] == 20
    assert first["losses"] == straight[:10]
    assert resumed["losses"] == straight[10:]  # exact float equality, not a tolerance
    assert resumed["digest"] == runs["straight"][0]["digest"]


def test_resume_without_data_position_differs(runs):
    """Negative control: the comparison above fails when the data position is not restored."""
    straight = runs["straight"][0]["losses"]
    no_data = runs["no_data"][0]
    # It restarted the data at sequence 0, so it has consumed only its own 10 steps' worth.
    assert no_data["step"] == 20
    assert no_data["consumed"] == runs["straight"][0]["consumed"] // 2
    assert no_data["losses"] != straight[10:]
    assert no_data["digest"] != runs["straight"][0]["digest"]


def test_resume_applies_a_changed_learning_rate(runs):
    """DeepSpeed restores the saved schedule; the run's config must win. Checked on the weights:
    `resumed` (lr 3e-3, min 3e-4) and `new_lr` (lr 1e-3, min 1e-4) take their first step from
    the same checkpoint, data position, RNG state and Adam moments, so the same gradient. An
    AdamW update (the step and the decoupled weight decay) is proportional to the rate, and both
    schedules are the same shape (min_lr = lr / 10), so new_lr's update must be a third of
    resumed's (to fp32 rounding). Were the saved schedule to win, the two would be equal."""
    import torch

    tmp = runs["tmp"]
    old = torch.load(tmp / "split.json.update.pt")  # the resumed launch wrote it last
    new = torch.load(tmp / "new_lr.json.update.pt")
    assert old.norm() > 0
    assert (new - old / 3).norm() / (old / 3).norm() < 1e-4
    # The logged rate is the one each step used: the first step of a run is in warmup.
    assert runs["straight"][0]["lrs"][0] == pytest.approx(3e-3 / 4)


def zero_mismatches(ref: dict, got: dict) -> list[str]:
    """Steps whose loss (rel 1e-4) or gradient norm (rel 1e-3) differ from the reference."""
    bad = []
    for key, tol in (("losses", 1e-4), ("grad_norms", 1e-3)):
        for step, (a, b) in enumerate(zip(ref[key], got[key], strict=True), 1):
            if b != pytest.approx(a, rel=tol):
                bad.append(f"{key} step {step}: {b} vs {a}")
    return bad


def test_zero3_with_accumulation_matches_zero0(runs):
    """The same global batch of 8 as 2 ranks x 1 micro-batch of 4 (ZeRO 0) and as 2 ranks x 2
    accumulated micro-batches of 2 (ZeRO 3, parameters partitioned) trains the same model."""
    z0, z3 = runs["zero0"][0], runs["zero3"][0]
    assert (z0["zero_stage"], z0["grad_accum"]) == (0, 1)
    assert (z3["zero_stage"], z3["grad_accum"]) == (3, 2)
    assert len(z3["losses"]) == 10
    assert zero_mismatches(z0, z3) == []
    # Negative control aimed at broken accumulation: with one of the step's four micro-batch
    # gradients dropped, the gradient norm of step 1 and every later loss leave the tolerance.
    dropped = zero_mismatches(z0, runs["zero3_drop"][0])
    assert "grad_norms step 1:" in " ".join(dropped) and "losses step 10:" in " ".join(dropped)


def test_checkpoints_are_complete_and_resume_continues_the_mlflow_run(runs):
    ckpts = runs["tmp"] / "runs" / "split" / "checkpoints"
    steps = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_"))
    assert steps == ["step_00000010", "step_00000020"]
    assert all((ckpts / s / "COMPLETE").is_file() for s in steps)
    assert (ckpts / "latest").read_text() == "step_00000020"
    assert sorted(p.name for p in (ckpts / "step_00000020").glob("rank_*.pt")) == [
        "rank_00000.pt",
        "rank_00001.pt",
    ]

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{runs['tmp'] / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pretrain")
    found = client.search_runs([exp.experiment_id], "attributes.run_name = 'split'")
    assert len(found) == 1  # the resumed launch reopened the same run
    run = found[0]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [5, 10, 15, 20]
    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted(m.step for m in val) == [10, 20]
    assert run.data.params["model.n_layers"] == "2"
    assert run.info.status == "FINISHED"
    log = (runs["tmp"] / "runs" / "split" / "train.log").read_text()
    assert "resumed from" in log and "step     20/20" in log and "saved checkpoint" in log


def test_memory_per_rank_is_printed_and_tracked(runs):
    """The start-up memory line and its MLflow metrics (pretrain.memory), checked against the
    model's parameter count: ZeRO-1 at DP=2 keeps every fp32 parameter (4 bytes each) and half
    of the fp32 master copy and the two Adam moments (12 / 2 bytes each)."""
    import mlflow

    from pretrain.config import load_config
    from pretrain.models.flops import param_count

    cfg = load_config(launching.ROOT / "configs" / "tiny.yaml", ["model.vocab_size=512"])
    n = param_count(cfg.model)
    client = mlflow.MlflowClient(f"sqlite:///{runs['tmp'] / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pretrain")
    run = client.search_runs([exp.experiment_id], "attributes.run_name = 'straight'")[0]
    metrics = {
        k: client.get_metric_history(run.info.run_id, f"memory_{k}_mib")
        for k in ("params", "grads", "optimizer", "activations_peak")
    }
    assert [m.step for m in metrics["params"]] == [1]
    assert metrics["params"][0].value * 2**20 == pytest.approx(4 * n, rel=1e-3)
    assert metrics["optimizer"][0].value * 2**20 == pytest.approx(6 * n, rel=1e-2)
    assert metrics["grads"][0].value > 0 and metrics["activations_peak"][0].value > 0
    log = (runs["tmp"] / "runs" / "straight" / "train.log").read_text()
    assert "memory per rank: params " in log and "(step 1)" in log
    # Peak memory of every rank, gathered on each log step: rank 1 holds EXTRA_MIB more, so it
    # must be named the busiest, by about that margin (rank 0's own figure alone cannot see it).
    peaks = {
        k: [m.value for m in client.get_metric_history(run.info.run_id, f"memory_rss_peak_{k}")]
        for k in ("mib_max", "mib_min", "rank")
    }
    assert len(peaks["rank"]) == 4 and set(peaks["rank"]) == {1.0}, peaks
    assert all(
        hi - lo > 0.8 * EXTRA_MIB for hi, lo in zip(peaks["mib_max"], peaks["mib_min"], strict=True)
    )
    assert "| peak RSS " in log and "MiB (rank 1; min " in log
