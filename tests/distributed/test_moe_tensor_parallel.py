"""Mixture of experts composed with tensor parallelism (pretrain/expert_parallel.py): TP=2
against TP=1 from the same weights and data, 5 fp32 steps with router jitter and random token
selection on and tokens dropped, in three torchrun launches (tests/distributed/moe_tp_worker.py):

  TP=1, 2 ranks  the references: ep=1 with both ranks given the same batches (the one-rank run)
                 and ep=2 with each rank its own; gradient clipping at ep=2 against ep=1
  TP=2, 2 ranks  dp=1, ep=1: plain and with sequence parallelism, against the one-rank run;
                 exact resume through the trainer, generation from its checkpoint
  TP=2, 4 ranks  dp=2, ep=2: plain, sequence parallel and ZeRO-2, against TP=1 at ep=2

Checks: losses within 1e-5 relative at every step, every step-1 gradient within 1e-5 (TP
shards gathered, experts by global index), TP ranks' gradients of replicated parameters (the
experts among them) identical. Negative controls, each aimed at one piece of the composition:
router noise drawn per TP rank (the replicated experts' routing disagrees), the sequence
gathered with a summing backward (sequence parallelism), DeepSpeed's own expert groups (an
expert-parallel group spanning a TP group). Clipping at ep=2: the per-step gradient norms
within 1e-5 of ep=1's too; DeepSpeed's own norm (a mean of per-rank norms) fails that.
"""

from __future__ import annotations

import json

import pytest
import torch
from equivalence import grad_failures, rel, rel_tensor
from launching import ROOT, torchrun

pytestmark = pytest.mark.slow
TOL = 1e-5
WORKER = ROOT / "tests" / "distributed" / "moe_tp_worker.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory, small_dataset) -> dict:
    tmp = tmp_path_factory.mktemp("moe_tp")
    out: dict = {}
    for name, nproc, tp, more in (
        ("tp1", 2, 1, []),
        ("tp2", 2, 2, [small_dataset, str(tmp)]),
        ("tp2_dp2", 4, 2, []),
    ):
        path = tmp / f"{name}.json"
        torchrun(WORKER, [str(path), str(tp), *more], nproc, tmp / f"{name}.log", timeout=900)
        out.update(json.loads(path.read_text()))
    return out


def as_tensors(run: dict) -> dict:
    return {**run, "grads": {n: torch.tensor(g) for n, g in run["grads"].items()}}


def loss_failures(ref: dict, got: dict) -> list[str]:
    return [
        f"loss step {i + 1}: {a} vs {b}"
        for i, (a, b) in enumerate(zip(got["losses"], ref["losses"], strict=True))
        if not rel(a, b) <= TOL
    ]


def failures(ref: dict, got: dict) -> list[str]:
    return loss_failures(ref, got) + grad_failures(as_tensors(ref), as_tensors(got), TOL)


@pytest.mark.parametrize("run", ["tp2", "tp2_sp"])
def test_tp2_matches_tp1(results, run):
    ref, got = results["ref_same"], results[run]
    assert any(".deepspeed_experts.3." in name for name in ref["grads"])
    assert ref["dropped"] > 0 and got["dropped"] > 0  # the capacity binds
    assert failures(ref, got) == []
    assert got["tp_spread"] == 0.0


@pytest.mark.parametrize("run", ["tp2_ep2", "tp2_ep2_sp"])
def test_tp2_dp2_ep2_matches_tp1(results, run):
    ref, got = results["ref_dp2"], results[run]
    assert got["dropped"] > 0
    assert failures(ref, got) == []
    assert got["tp_spread"] == 0.0


def test_tp2_dp2_ep2_zero2_matches_tp1(results):
    assert loss_failures(results["ref_dp2"], results["tp2_ep2_zero2"]) == []


def test_routing_that_differs_between_tp_ranks_fails(results):
    """Negative control: jitter and token selection drawn from a different stream on each TP
    rank, so the ranks holding the same experts route differently."""
    got = results["tp2_rank_streams"]
    assert any(b.startswith("loss step 1") for b in loss_failures(results["ref_same"], got))
    assert got["tp_spread"] > 0


def test_sequence_gather_with_a_summing_backward_fails(results):
    """Negative control (sequence parallelism): the sequence gathered before the experts as
    a TP layer's input is, whose backward sums the ranks' gradients; the experts' inputs are
    replicated, so every gradient below them is counted twice. The forward is unchanged."""
    ref, got = results["ref_same"], results["tp2_sp_summed_gather"]
    assert rel(got["losses"][0], ref["losses"][0]) <= TOL
    bad = grad_failures(as_tensors(ref), as_tensors(got), TOL)
    assert any("blocks.0." in b for b in bad)


def test_deepspeed_expert_groups_fail(results):
    """Negative control: DeepSpeed's own expert groups, from consecutive global ranks, make
    a TP group an expert-parallel group; the TP ranks' tokens reach the wrong experts."""
    ref, got = results["ref_dp2"], results["tp2_ep2_deepspeed_groups"]
    bad = failures(ref, got)
    assert any(b.startswith("loss step 1") for b in bad)
    assert any("deepspeed_experts" in b for b in bad)


def test_tp2_moe_resume_is_bitwise(results):
    """20 steps straight against 10 + checkpoint + 10 in a new engine, at TP=2 (each TP rank
    saves and loads its own copy of the experts): every loss and the final weights equal."""
    for rank in results["resume_per_rank"]:
        straight, resumed = rank["straight"], rank["resumed"]
        assert len(straight["losses"]) == 20 and len(resumed["losses"]) == 10
        assert resumed["first"] + resumed["losses"] == straight["losses"]  # exact equality
        assert resumed["digest"] == straight["digest"]


def test_generation_loads_a_tp2_moe_checkpoint(results, world1):
    """The TP=2 run's final checkpoint, loaded by pretrain-generate's loader into this process
    (TP shards merged, experts from the TP rank 0 files), gives the trained engine's logits."""
    from pretrain.generate_cli import load_model

    gen = results["resume_per_rank"][0]["generation"]
    model, _ = load_model(gen["checkpoint"])
    tokens = (torch.arange(2 * 16) * 7 % model.cfg.vocab_size).view(2, 16)  # as the worker's
    with torch.no_grad():
        loaded = model(tokens)[:, -1]
    assert rel_tensor(loaded, torch.tensor(gen["trained"])) <= TOL


def norm_failures(ref: dict, got: dict) -> list[str]:
    return [
        f"grad norm step {i + 1}: {a} vs {b}"
        for i, (a, b) in enumerate(zip(got["norms"], ref["norms"], strict=True))
        if not rel(a, b) <= TOL
    ]


def test_clipping_at_ep2_matches_ep1(results):
    """With clipping engaged at every step, ep=2 (dp=2) takes the gradient norm and clip
    factor of ep=1: every expert counted once (pretrain.expert_parallel.clip_expert_parallel)."""
    ref, got = results["clip_ep1"], results["clip_ep2"]
    assert len(ref["norms"]) == 5 and min(ref["norms"]) > 0.05  # the limit: clipping engages
    assert norm_failures(ref, got) == []
    assert failures(ref, got) == []


def test_deepspeed_mean_of_rank_norms_fails(results):
    """Negative control: DeepSpeed's norm at ep=2, the mean of each rank's norm over its own
    experts, is not the model's norm."""
    bad = norm_failures(results["clip_ep1"], results["clip_ep2_deepspeed_norm"])
    assert any(b.startswith("grad norm step 1") for b in bad)
