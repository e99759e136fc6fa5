"""The model-parallel generator at TP=2 (two gloo processes, one launch: rng_worker.py).

attention   identical inputs on both TP ranks draw different attention-probability masks
residual    without sequence parallelism the replicated residual/embedding dropout masks are
            the same on both ranks; with it each sequence shard draws its own
recompute   full and selective recompute (intervals 1 and 2) give the gradients of no
            recompute within 1e-6 at TP=2 with sequence parallelism and dropout on; controls:
            another model-parallel draw moves them far, and torch's checkpoint without
            rewinding the model-parallel generator fails the same check
resume      a run resumed from a checkpoint continues bitwise (losses and weights); the
            control resumes everything but the model-parallel generator's state and differs
"""

from __future__ import annotations

from pathlib import Path

import launching
import pytest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).resolve().parent / "rng_worker.py"
GRAD_RTOL = 1e-6


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("rng")
    launching.torchrun(WORKER, [str(out)], 2, out / "rng_worker.log", timeout=600)
    return torch.load(out / "rng.pt", weights_only=False)


def section(record, name: str):
    value = record[name]
    if isinstance(value, dict) and "error" in value:
        pytest.fail(f"section {name} raised on the workers:\n{value['error']}")
    return value


def looks_like_dropout(keep) -> bool:
    """The masks are real dropout masks at p = 0.5 (not all kept, not all dropped), so that
    comparing them compares draws."""
    kept = float(keep.float().mean())
    return 0.3 < kept < 0.7


def test_attention_masks_differ_across_tp_ranks(record):
    masks = section(record, "attention")
    assert len(masks) == 2 and masks[0].shape == masks[1].shape
    assert all(looks_like_dropout(m) for m in masks)
    # Each rank's heads are different heads: sharing one mask pattern would correlate them.
    assert not masks[0].equal(masks[1]), "both TP ranks drew the same attention mask"


def test_replicated_residual_masks_agree_across_tp_ranks(record):
    rank0, rank1 = section(record, "residual")["plain"]
    # The embedding dropout and two per block (attention and MLP branches) of 2 blocks.
    assert len(rank0) == len(rank1) == 5
    for a, b in zip(rank0, rank1, strict=True):
        assert a.shape[1] == 16  # the whole sequence on every rank ([b, s, d])
        assert looks_like_dropout(a)
        assert a.equal(b), "TP ranks dropped different elements of a replicated tensor"


def test_sequence_shards_draw_their_own_residual_masks(record):
    rank0, rank1 = section(record, "residual")["sp"]
    assert len(rank0) == len(rank1) == 5
    for a, b in zip(rank0, rank1, strict=True):
        assert a.shape[0] == 8  # half of the 16 positions per rank
        assert looks_like_dropout(a)
        assert not a.equal(b), "both sequence shards drew the same residual mask"


@pytest.mark.parametrize("policy", ["full-1", "full-2", "selective-1", "selective-2"])
def test_recompute_gives_the_gradients_of_no_recompute(record, policy):
    per_rank = section(record, "recompute")[policy]
    assert len(per_rank) == 2
    assert all(r <= GRAD_RTOL for r in per_rank), per_rank


def test_recompute_controls(record):
    rec = section(record, "recompute")
    # Other dropout masks change the gradients far beyond the tolerance ...
    assert all(r > 1e3 * GRAD_RTOL for r in rec["other_masks"])
    # ... and recompute that rewinds only the default generator (torch's checkpoint alone)
    # draws other masks, while run_block on the same block matches.
    assert all(r > 1e3 * GRAD_RTOL for r in rec["block_naive"])
    assert all(r <= GRAD_RTOL for r in rec["block_run_block"])


def test_resume_is_bitwise_with_dropout_at_tp2(record):
    res = section(record, "resume")
    straight, resumed = res["straight"], res["resumed"]
    for rank in range(2):
        assert len(straight[rank]) == 6 and len(resumed[rank]) == 3
        assert resumed[rank] == straight[rank][3:]  # exact float equality
    assert res["digests"]["resumed"] == res["digests"]["straight"]
    # Every rank file holds its own generator state: the TP ranks' streams differ.
    states = res["model_rng_states"]
    assert all(s is not None for s in states)
    same = states[0]["states"]["cpu"].equal(states[1]["states"]["cpu"])
    assert not same, "both TP ranks saved the same model-parallel generator state"


def test_resume_without_the_model_parallel_state_differs(record):
    """Negative control: the same resume, with every state restored except the model-parallel
    generator's, draws other attention masks and ends elsewhere."""
    res = section(record, "resume")
    for rank in range(2):
        assert res["control"][rank] != res["straight"][rank][3:]
    assert res["digests"]["control"] != res["digests"]["straight"]
