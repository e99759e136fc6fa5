"""Exact resume on the sharded layouts, dropout on: a run that stops and resumes in new
processes is bitwise the run that never stopped (losses, weights and Adam moments).

For each layout a `straight` run trains 6 steps with checkpoints every 3, and a `resumed` run
starts new processes from the straight run's step 3 and trains steps 4-6. Both dump, right after
saving step 6, every parameter's fp32 value and both moments through DeepSpeed's accessors
(reshard_worker.py). Layouts: DP=2 ZeRO-2 bf16; DP=2 ZeRO-3 with 2 accumulation steps; TP=2 x
DP=2 ZeRO-1; TP=2 x PP=2 ZeRO-1 (fp32 there). The one-process and ZeRO-1 DP=2 cases are in
test_training.py, the families in test_family_training.py.

Negative controls on TP=2 x DP=2: resuming without the RNG state (every rank's dropout streams)
and without the data position must both change the losses.
"""

from __future__ import annotations

import json
from pathlib import Path

import launching
import pytest
import torch

pytestmark = pytest.mark.slow

WORKER = launching.ROOT / "tests" / "distributed" / "reshard_worker.py"
COMMON = [
    "run.train_steps=6",
    "checkpoint.interval=3",
    "checkpoint.keep_last=0",
    "run.log_interval=1",
    "run.eval_interval=0",
    "run.sample_tokens=0",
    "model.dropout=0.1",
    "parallel.micro_batch_size=2",
    "optim.warmup_steps=2",
    "tracking.enabled=false",
]
CASES = {  # name: (processes, overrides)
    "z2_bf16": (2, ["parallel.zero_stage=2", "run.precision=bf16"]),
    "z3_accum": (2, ["parallel.zero_stage=3", "parallel.global_batch_size=8"]),
    "tp2dp2": (4, ["parallel.tp=2", "parallel.zero_stage=1"]),
    "tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"]),
}
CONTROLS = {"no_rng": "[rng]", "no_data": "[data]"}  # on tp2dp2


def launch(tmp: Path, name: str, nproc: int, data: str, overrides: list[str]) -> dict:
    out = tmp / f"{name}.json"
    args = [
        str(out),
        str(tmp / f"dump_{name}"),
        "save:6",
        str(launching.ROOT / "configs" / "tiny.yaml"),
        f"data.path={data}",
        f"run.output_dir={tmp / 'runs'}",
        f"run.name={name}",
        *COMMON,
        *overrides,
    ]
    launching.torchrun(WORKER, args, nproc, tmp / f"{name}.log")
    return json.loads(out.read_text())[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_dataset):
    tmp = tmp_path_factory.mktemp("exact")
    out = {}
    for name, (nproc, overrides) in CASES.items():
        out[name] = launch(tmp, name, nproc, small_dataset, overrides)
        step3 = tmp / "runs" / name / "checkpoints" / "step_00000003"
        resume = [*overrides, f"run.resume={step3}"]
        out[name + "_resumed"] = launch(tmp, name + "_resumed", nproc, small_dataset, resume)
    nproc, overrides = CASES["tp2dp2"]
    step3 = tmp / "runs" / "tp2dp2" / "checkpoints" / "step_00000003"
    for name, part in CONTROLS.items():
        extra = [f"run.resume={step3}", f"checkpoint.exclude_from_loading={part}"]
        out[name] = launch(tmp, name, nproc, small_dataset, overrides + extra)
    return tmp, out


def dumps(dump_dir: Path) -> dict[tuple[int, str], dict]:
    """{(rank, name): {param, exp_avg, exp_avg_sq}} as each rank held them."""
    found = {}
    for f in sorted(dump_dir.glob("rank*.pt")):
        rank = int(f.stem[4:])
        for name, entry in torch.load(f, weights_only=False)["tensors"].items():
            found[rank, name] = entry
    return found


@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_bitwise_the_run_that_never_stopped(runs, case):
    tmp, out = runs
    straight, resumed = out[case], out[case + "_resumed"]
    assert resumed["step"] == 6 and len(resumed["losses"]) == 3
    assert resumed["losses"] == straight["losses"][3:]  # exact float equality
    assert resumed["consumed"] == straight["consumed"]
    a, b = dumps(tmp / f"dump_{case}"), dumps(tmp / f"dump_{case}_resumed")
    assert sorted(a) == sorted(b)
    differ = [
        f"{key}.{kind}"
        for key in a
        for kind in ("param", "exp_avg", "exp_avg_sq")
        if not torch.equal(a[key][kind], b[key][kind])
    ]
    assert differ == []


@pytest.mark.parametrize("control", list(CONTROLS))
def test_negative_controls_change_the_losses(runs, control):
    _, out = runs
    straight, broken = out["tp2dp2"], out[control]
    assert broken["losses"] != straight["losses"][3:]
