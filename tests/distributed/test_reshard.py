"""Resharding: checkpoints saved on one layout resume on another (pretrain.reshard), through
torchrun and the real entry point, dropout off (another layout draws other dropout masks).

Three source runs train 6 steps (checkpoint at 4) at TP=2 x DP=2, each at another ZeRO stage,
with the vocabulary padded to a multiple of 96 x TP (576 rows for the 512-token tokenizer).
Each dumps, right after saving step 4, every parameter's fp32 value and Adam moments as its
ranks hold them (tests/distributed/reshard_worker.py, through DeepSpeed's own accessors). Each
target run resumes a source's step 4 on another layout, dumps the same right after loading,
and trains steps 5 and 6. The test joins each dump's tensor-parallel shards itself and compares:

- every full tensor (weights, exp_avg, exp_avg_sq), real vocabulary rows, bitwise equal;
- steps 5 and 6's losses within 1e-5 relative of the source's (the run that never stopped),
  fp32: step 5's loss tests the weights, step 6's the update made with the moments;
- the data position: the same sequences consumed after step 6;
- the consolidated copy made once per checkpoint (not rebuilt by a second target).

Negative control: a target that leaves the optimizer state out (checkpoint.exclude_from_loading)
must miss both the moments and step 6's loss, so these comparisons would catch a reshard that
lost the optimizer state.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import launching
import pytest
import torch

pytestmark = pytest.mark.slow

WORKER = launching.ROOT / "tests" / "distributed" / "reshard_worker.py"
COMMON = [
    "run.train_steps=6",
    "checkpoint.interval=4",
    "checkpoint.keep_last=0",
    "run.log_interval=1",
    "run.eval_interval=0",
    "run.sample_tokens=0",
    "model.dropout=0.0",
    "parallel.micro_batch_size=4",
    "parallel.global_batch_size=16",
    "optim.warmup_steps=2",
    "tracking.enabled=false",
]
SOURCES = {  # name: (processes, overrides)
    "z1": (4, ["parallel.tp=2", "parallel.zero_stage=1", "model.vocab_multiple=96"]),
    "z3": (4, ["parallel.tp=2", "parallel.zero_stage=3", "model.vocab_multiple=96"]),
    "z0": (4, ["parallel.tp=2", "parallel.zero_stage=0", "model.vocab_multiple=96"]),
}
TARGETS = {  # name: (source, processes, overrides)
    "tp1dp4": ("z1", 4, ["parallel.zero_stage=1"]),
    "dp2z3": ("z1", 2, ["parallel.zero_stage=3"]),
    "pp2dp2": ("z1", 4, ["parallel.pp=2", "parallel.zero_stage=1"]),
    # One process, ZeRO-0, the vocabulary padded to 528 rows instead of 576.
    "one": ("z3", 1, ["parallel.zero_stage=0", "model.vocab_multiple=48"]),
    "tp1bf16": (
        "z0",
        2,
        ["parallel.zero_stage=1", "run.precision=bf16", "model.vocab_multiple=48"],
    ),
    "no_optimizer": (
        "z1",
        2,
        ["parallel.zero_stage=1", "checkpoint.exclude_from_loading=[optimizer]"],
    ),
}
TOKENIZER = 512  # tests/conftest.py small_dataset
# One row per vocabulary entry: written here, not taken from pretrain.reshard.
VOCAB_ROWS = re.compile(r"(^|\.)(embed|head)\.weight$|(^|\.)out_bias$")
KINDS = ("param", "exp_avg", "exp_avg_sq")


def launch(tmp: Path, name: str, nproc: int, when: str, data: str, overrides: list[str]) -> list:
    out = tmp / f"{name}.json"
    args = [
        str(out),
        str(tmp / f"dump_{name}"),
        when,
        str(launching.ROOT / "configs" / "tiny.yaml"),
        f"data.path={data}",
        f"run.output_dir={tmp / 'runs'}",
        f"run.name={name}",
        *COMMON,
        *overrides,
    ]
    launching.torchrun(WORKER, args, nproc, tmp / f"{name}.log")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_dataset):
    tmp = tmp_path_factory.mktemp("reshard")
    records, stamps = {}, {}
    for name, (nproc, overrides) in SOURCES.items():
        records[name] = launch(tmp, name, nproc, "save:4", small_dataset, overrides)
    for name, (source, nproc, overrides) in TARGETS.items():
        step4 = tmp / "runs" / source / "checkpoints" / "step_00000004"
        resume = [f"run.resume={step4}"]
        records[name] = launch(tmp, name, nproc, "load", small_dataset, overrides + resume)
        done = step4 / "universal" / "COMPLETE"
        stamps.setdefault(source, []).append(done.stat().st_mtime_ns)
    return tmp, records, stamps


def full_tensors(dump_dir: Path) -> dict[str, dict[str, torch.Tensor | None]]:
    """{name: {kind: full tensor}} from every rank's dump: the tensor-parallel shards joined
    along their recorded dimension in TP-rank order, the vocabulary's padding rows cut."""
    dumps = [torch.load(f, weights_only=False) for f in sorted(dump_dir.glob("rank*.pt"))]
    tp = dumps[0]["tp"]
    by_name: dict[str, dict[int, dict]] = {}
    for d in dumps:
        for name, entry in d["tensors"].items():
            by_name.setdefault(name, {}).setdefault(d["tp_rank"], entry)
    out = {}
    for name, shards in by_name.items():
        parts = [shards[r] for r in range(tp)]
        dim = parts[0]["dim"]
        out[name] = {}
        for kind in KINDS:
            pieces = [p[kind] for p in parts]
            if pieces[0] is None:
                out[name][kind] = None
                continue
            t = torch.cat(pieces, dim) if dim is not None and tp > 1 else pieces[0]
            out[name][kind] = t[:TOKENIZER] if VOCAB_ROWS.search(name) else t
    return out


def differing(a: dict, b: dict, kinds=KINDS) -> list[str]:
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    return [
        f"{name}.{k}"
        for name in a
        for k in kinds
        if a[name][k] is None or b[name][k] is None or not torch.equal(a[name][k], b[name][k])
    ]


@pytest.mark.parametrize("target", ["tp1dp4", "dp2z3", "pp2dp2", "one", "tp1bf16"])
def test_every_full_tensor_carried_over(runs, target):
    tmp, records, _ = runs
    source = TARGETS[target][0]
    saved, loaded = full_tensors(tmp / f"dump_{source}"), full_tensors(tmp / f"dump_{target}")
    assert differing(saved, loaded) == []
    # What the comparison covers: trained moments, and padding that really changed.
    assert all(saved[n]["exp_avg_sq"].abs().sum() > 0 for n in saved)
    complete = tmp / "runs" / target / "checkpoints" / "step_00000006" / "COMPLETE"
    rows = json.loads(complete.read_text())["model"]["vocab_size"]
    assert rows == (528 if "model.vocab_multiple=48" in TARGETS[target][2] else 512)


@pytest.mark.parametrize("target", ["tp1dp4", "dp2z3", "pp2dp2", "one"])
def test_next_step_matches_the_run_that_never_stopped(runs, target):
    _, records, _ = runs
    source = records[TARGETS[target][0]][0]
    resumed = records[target][0]
    assert resumed["step"] == 6 and len(resumed["losses"]) == 2
    assert resumed["losses"] == pytest.approx(source["losses"][4:6], rel=1e-5)
    # The data stream continues: the same sequences consumed, none repeated or skipped
    # (either would also change the losses above).
    assert resumed["consumed"] == source["consumed"]
    assert resumed["resharded"], "the layout change was not noticed"


def test_bf16_target_trains_on(runs):
    _, records, _ = runs
    source, resumed = records["z0"][0], records["tp1bf16"][0]
    # bf16 rounds the weights it computes with: close to fp32's step, not equal.
    assert resumed["losses"] == pytest.approx(source["losses"][4:6], rel=2e-2)
    assert resumed["consumed"] == source["consumed"]


def test_resharding_is_announced_and_cached(runs):
    tmp, _, stamps = runs
    log = (tmp / "pp2dp2.log").read_text()
    line = next(ln for ln in log.splitlines() if "resharded step_00000004" in ln)
    assert "tp 2 -> 1" in line and "pp 1 -> 2" in line and "vocabulary rows 576 -> 512" in line
    # Three targets resumed z1's checkpoint; its consolidated copy was written once.
    assert len(set(stamps["z1"])) == 1 and len(stamps["z1"]) == 4


def test_negative_control_without_optimizer_state(runs):
    tmp, records, _ = runs
    saved, loaded = full_tensors(tmp / "dump_z1"), full_tensors(tmp / "dump_no_optimizer")
    assert differing(saved, loaded, kinds=("param",)) == []
    assert differing(saved, loaded, kinds=("exp_avg",)), "moments equal without loading them"
    lost = records["no_optimizer"][0]["losses"]
    # Step 5's loss depends on the weights only; step 6's on the update the moments shaped.
    assert lost[0] == pytest.approx(records["z1"][0]["losses"][4], rel=1e-5)
    assert lost[1] != pytest.approx(records["z1"][0]["losses"][5], rel=1e-5)
