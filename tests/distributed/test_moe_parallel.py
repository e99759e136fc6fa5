"""Mixture of experts over 2 gloo processes, in one torchrun launch (tests/distributed/
moe_worker.py):

- expert parallel 2 against expert parallel 1 (dp=2 both, same initial weights and data,
  fp32, dropout, router jitter and random token selection on, capacity dropping tokens):
  losses within 1e-5 relative over 5 steps, every step-1 gradient within 1e-5 (by global
  expert name); ep=2 under ZeRO-2 matches too;
- negative control: the experts permuted across the two ranks (each holds the other's), so the
  all-to-all delivers tokens to the wrong experts: the same checks fail;
- exact resume at ep=2 through the trainer: 10 steps, checkpoint, 10 more in a new engine,
  against 20 straight: every loss and the final weights bitwise equal on both ranks;
- generation: the ep=2 checkpoint loaded by pretrain-generate's loader (one process) gives the
  trained engine's logits.
"""

from __future__ import annotations

import json

import pytest
from equivalence import rel, rel_tensor
from launching import ROOT, torchrun

pytestmark = pytest.mark.slow
TOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory, small_dataset):
    tmp = tmp_path_factory.mktemp("moe")
    out = tmp / "moe.json"
    worker = ROOT / "tests" / "distributed" / "moe_worker.py"
    torchrun(worker, [str(out), small_dataset, str(tmp)], 2, tmp / "moe.log", timeout=1200)
    return json.loads(out.read_text())


def failures(ref: dict, got: dict) -> list[str]:
    import torch

    bad = [
        f"loss step {i + 1}: {a} vs {b}"
        for i, (a, b) in enumerate(zip(got["losses"], ref["losses"], strict=True))
        if not rel(a, b) <= TOL
    ]
    for name, g in ref["grads"].items():
        r = rel_tensor(torch.tensor(got["grads"][name]), torch.tensor(g))
        if not r <= TOL:
            bad.append(f"grad {name}: rel {r:.2e}")
    return bad


def test_expert_parallel_2_matches_1(results):
    ref = results["ep1"]
    assert len(ref["grads"]) == len(results["ep2"]["grads"])
    assert any("deepspeed_experts.3." in name for name in ref["grads"])
    assert failures(ref, results["ep2"]) == []


def test_expert_parallel_2_with_zero2_matches(results):
    got, ref = results["ep2_zero2"]["losses"], results["ep1"]["losses"]
    assert all(rel(a, b) <= TOL for a, b in zip(got, ref, strict=True)), (got, ref)


def test_experts_permuted_across_ranks_fail(results):
    """Negative control aimed at the all-to-all: same experts, the wrong rank's."""
    bad = failures(results["ep1"], results["ep2_permuted"])
    assert any(b.startswith("loss step 1") for b in bad)
    assert any("deepspeed_experts" in b for b in bad)


def test_moe_resume_is_bitwise(results):
    for rank in results["resume_per_rank"]:
        straight, resumed = rank["straight"], rank["resumed"]
        assert len(straight["losses"]) == 20 and len(resumed["losses"]) == 10
        assert resumed["first"] + resumed["losses"] == straight["losses"]  # exact equality
        assert resumed["digest"] == straight["digest"]


def test_generation_loads_an_expert_parallel_checkpoint(results):
    """The ep=2 run's final checkpoint, loaded by pretrain-generate's loader into one process
    (ep=1), gives the trained engine's logits."""
    import torch

    gen = results["resume"]["generation"]
    trained, loaded = torch.tensor(gen["trained"]), torch.tensor(gen["loaded"])
    assert rel_tensor(loaded, trained) <= TOL
