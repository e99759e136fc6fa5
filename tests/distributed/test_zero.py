"""ZeRO-3 construction and fp32 gradient accumulation under bf16, on gloo through torchrun.

Each launch (tests/distributed/zero_worker.py) runs several checks, since every process pays
for importing DeepSpeed and megatron-core.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import launching
import pytest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("zero_worker.py")


def run_worker(tmp: Path, name: str, nproc: int, *args: str) -> list[dict]:
    out = tmp / f"{name}.json"
    launching.torchrun(WORKER, [args[0], str(out), *args[1:]], nproc, tmp / f"{name}.log")
    return json.loads(out.read_text())


@pytest.fixture(scope="module", params=[(2, 1), (4, 2)], ids=["dp2", "tp2xdp2"])
def construction(request, tmp_path_factory):
    nproc, tp = request.param
    return run_worker(tmp_path_factory.mktemp("zero3"), "construct", nproc, "construct", str(tp))


def test_zero3_construction_never_holds_more_than_one_module(construction):
    for r in construction:
        # Negative control: the plain build holds the whole model (this rank's TP shard) at
        # once, so the check below fails for a build without zero.Init.
        assert r["unsharded_peak"] == r["total"] > r["bound"]
        # Under zero.Init at most one module's own parameters are materialised at a time...
        assert r["sharded_peak"] <= r["bound"]
        # ...and once built, nothing is materialised and this rank keeps 1/dp of every weight.
        assert r["sharded_live_after"] == 0
        assert r["held"] == r["shard"]
        assert r["shard"] <= math.ceil(r["total"] / r["dp"]) + 4 * 64


def test_zero3_initial_weights_equal_the_unsharded_build(construction):
    for r in construction:
        assert r["equal"] and r["buffers_equal"], r
        assert r["bert_equal"] and r["t5_equal"], r
        # bf16: the same numbers the engine gets by casting an unsharded fp32 build.
        assert r["bf16_equal"] and r["bf16_buffers_equal"], r
        # Negative control: DeepSpeed's default zero.Init creates tensors in bf16 (megatron's
        # master weights are drawn in bf16, rotary tables computed in bf16): not equal.
        assert not r["bf16_default_equal"], r


def test_zero3_partitions_over_the_data_parallel_group(construction):
    r4 = [r for r in construction if r["tp"] == 2]
    if not r4:
        pytest.skip("only the TP=2 launch partitions across tensor-parallel shards")
    assert all(r["equal"] for r in r4)
    # Negative control: partitioned over the world, TP rank 1's shards are overwritten by
    # rank 0's broadcast.
    assert not all(r["world_group_equal"] for r in r4)


@pytest.fixture(scope="module")
def accumulation(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("accumulate"), "accumulate", 2, "accumulate")


# bf16 keeps 8 significant bits: a value is rounded by up to u = 2^-8 of itself.
BF16_U = 2.0**-8


def check_bf16_training(training: dict) -> None:
    """The run's bf16 engine (ZeRO-1, fp32 master weights) trained BF16_STEPS steps against the
    same run in fp32, both measured on one held-out batch (zero_worker.trained_losses).

    Tolerance from bf16's precision: before training the two models hold the same weights, one
    rounded, so their losses differ by at most one rounding (u). Each step then rounds the
    weights and activations once more, and these errors add at most linearly, so after N steps
    the losses agree within N * u (relative). The negative control is the same bf16 run one
    step short: it must fall outside that band, or the band could not see a step go wrong."""
    fp32, bf16 = training["fp32"], training["bf16"]
    n = max(int(k) for k in fp32 if k.isdigit())
    assert bf16["bf16"] and bf16["param_dtype"] == "torch.bfloat16", bf16
    assert not fp32["bf16"] and fp32["param_dtype"] == "torch.float32", fp32
    # Training happened: far below the near-uniform model's log V (about 6.24 for V = 512).
    assert fp32[str(n)] < fp32["start"] / 2, fp32
    print(f"bf16 vs fp32 after {n} steps: {bf16[str(n)]:.4f} vs {fp32[str(n)]:.4f}")
    assert abs(bf16["start"] - fp32["start"]) <= BF16_U * fp32["start"]
    assert abs(bf16[str(n)] - fp32[str(n)]) <= n * BF16_U * fp32[str(n)]
    assert abs(bf16[str(n - 1)] - fp32[str(n)]) > n * BF16_U * fp32[str(n)]  # control


def test_bf16_engine_trains_like_fp32(accumulation):
    check_bf16_training(accumulation[0]["training"])


@pytest.mark.gpu
def test_bf16_engine_trains_like_fp32_on_cuda(tmp_path):
    """The same check on a GPU (one process, ZeRO-1 over NCCL)."""
    check_bf16_training(run_worker(tmp_path, "bf16", 1, "bf16train", "cuda")[0]["training"])


# fp32 keeps 24 significant bits. Adding 8 micro-batch gradients and averaging 2 ranks rounds
# each element at most 8 + 1 times by 2^-24 of the running value: the bound on the relative
# error of fp32 accumulation and reduction. bf16 (8 bits) rounds each addition by up to 2^-8.
FP32_ACCUMULATION_BOUND = (8 + 1) * 2.0**-24


def test_bf16_accumulates_and_reduces_in_fp32(accumulation):
    """8 accumulated micro-batches of a bf16 model at DP=2: the gradient DeepSpeed hands the
    optimizer equals the exact (fp64) sum of the micro-batch gradients autograd produced, to fp32
    rounding, so accumulation and reduction run in fp32 (our config). The negative control is
    DeepSpeed's defaults (accumulation and reduction in bf16): off by bf16 rounding."""
    stages = accumulation[0]["stages"]
    for stage, s in stages.items():
        fp32, bf16 = s["fp32_accumulation_error"], s["bf16_accumulation_error"]
        print(
            f"ZeRO-{stage}: relative gradient error vs the exact sum, fp32 accumulation "
            f"{fp32:.2e}, bf16 accumulation {bf16:.2e}"
        )
    assert stages["1"]["optimizer_fp32_accumulation"] == "BF16_Optimizer"
    for s in stages.values():
        assert 0 <= s["fp32_accumulation_error"] <= FP32_ACCUMULATION_BOUND, s
        # The control: bf16 accumulation leaves the fp32 bound by orders of magnitude.
        assert s["bf16_accumulation_error"] > 100 * FP32_ACCUMULATION_BOUND, s


def test_refusals_come_before_any_process_group(tmp_path, capsys, group_starts):
    """bf16 without ZeRO cannot accumulate in fp32 in DeepSpeed 0.19.8: refused while the
    config is read, with the fix in the message, and no process group is ever started."""
    from pretrain.train import main

    code = main(
        [
            str(launching.ROOT / "configs" / "tiny.yaml"),
            "run.precision=bf16",
            "parallel.zero_stage=0",
            f"run.output_dir={tmp_path}",
        ]
    )
    assert code == 2
    assert "parallel.zero_stage=0" in capsys.readouterr().err  # names the value and the fix
    assert group_starts == []
    assert not (tmp_path / "tiny").exists()  # nothing half-written either
