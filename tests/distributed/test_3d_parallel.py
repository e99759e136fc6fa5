"""3D parallelism computes the same model: every layout of tests/distributed/layout_cases.py
against one process taking the same global batch of 8 sequences from the same initial weights,
through the real model builders, DeepSpeed engines (data-parallel and pipeline) and Trainer.

Three launches, one per world size (each process pays for importing DeepSpeed and megatron-core;
the worker rebuilds the groups between layouts):

  1 process   references: GPT, BERT, T5 (8 x 1); token weighting: BERT with uneven loss-token
              counts as 8 x 1, 1 x 8 and 4 x 2 (micro-batch x accumulation), and the 1 x 8 and
              4 x 2 splits averaging per-micro-batch means (the negative control)
  2 processes BERT and T5 at PP=2; GPT at DP=2 with 2 accumulation steps (ZeRO-0), ZeRO-2 and
              ZeRO-3; token weighting at DP=2 x accumulation 2; the controls of DP, of
              accumulation and of ZeRO-3
  4 processes GPT at TP2xPP2 (also with sequence parallelism), PP2xDP2, TP2xDP2 with ZeRO-1;
              the pipeline's control; the rank placement of both pipeline layouts

Checks (fp32, dropout 0: masks legitimately differ between layouts; gradient clipping engages at
every step, so a wrong global norm changes the updates):
  initial weights   stitched full tensors == the reference's, bit for bit (the premise)
  step 1            loss within 1e-5 relative; EVERY gradient (full tensors under one-process
                    names: TP shards gathered, pipeline stages stitched, ZeRO partitions
                    assembled) within 1e-5 in norm; the global gradient norm likewise
  10 steps          losses and global gradient norms within 1e-4 at every step
  token weighting   every gradient within 1e-6 of the one-batch gradient
  placement         megatron-core's TP/PP/DP groups == DeepSpeed's pipeline grid's, on every rank
Negative controls, each aimed at its layout's own failure (layout_cases.CONTROLS): the check
they break must fail, while the checks they leave alone pass.
"""

from __future__ import annotations

import time
from pathlib import Path

import equivalence as eq
import launching
import pytest
from equivalence import grad_failures, rel
from layout_cases import CONTROLS, RUNS, reference, runs_for

pytestmark = pytest.mark.slow

WORKER = Path(__file__).resolve().parent / "layout_worker.py"

LOSS_RTOL_STEP1 = 1e-5
GRAD_RTOL = 1e-5
LOSS_RTOL_STEPS = 1e-4
TOKEN_GRAD_RTOL = 1e-6

REFERENCES = {"gpt.ref", "bert.ref", "t5.ref", "tok.ref"}
# Layouts that must match their reference (not references, not broken on purpose).
LAYOUTS = [n for n, r in RUNS.items() if n not in REFERENCES and r.control is None]
MODEL_LAYOUTS = [n for n in LAYOUTS if RUNS[n].case != "bert-tokens"]
TOKEN_SPLITS = [n for n in LAYOUTS if RUNS[n].case == "bert-tokens"]
PIPELINES = [n for n in LAYOUTS if RUNS[n].pp > 1 and RUNS[n].world == 4]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("layouts")
    seconds = {}
    for world in (1, 2, 4):
        t0 = time.perf_counter()
        log = out / f"launch_{world}.log"
        launching.torchrun(WORKER, [str(out), *runs_for(world)], world, log, 900)
        seconds[world] = time.perf_counter() - t0
    print("\n3D-parallel launches: " + ", ".join(f"{w} proc {s:.1f} s" for w, s in seconds.items()))

    cache: dict[str, dict] = {}

    def load(name: str) -> dict:
        if name not in cache:
            cache[name] = torch.load(out / f"{name}.pt", weights_only=False)
        return cache[name]

    return load


# --- the checks (each returns what failed, so the controls can assert that it does) ---------


def step1_loss_failures(ref: dict, got: dict) -> list[str]:
    return eq.step1_loss_failures(ref, got, LOSS_RTOL_STEP1)


def step1_grad_failures(ref: dict, got: dict) -> list[str]:
    return eq.step1_grad_failures(ref, got, GRAD_RTOL)


def trajectory_failures(ref: dict, got: dict) -> list[str]:
    return eq.trajectory_failures(ref, got, LOSS_RTOL_STEPS)


def pair(runs, name: str) -> tuple[dict, dict]:
    return runs(reference(name)), runs(name)


# --- every layout -------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAYOUTS + [n for n, r in RUNS.items() if r.control])
def test_initial_weights_are_the_reference_weights(runs, name):
    """The premise: the stitched full weights are the one-process weights bit for bit, and
    every copy (data-parallel replicas, tensor-parallel replicas, the tied embedding on both
    pipeline ends) is identical."""
    import torch

    ref, got = pair(runs, name)
    assert got["init"].keys() == ref["init"].keys()
    for n, w in ref["init"].items():
        assert torch.equal(got["init"][n], w), n
    assert all(d == 0.0 for d in got["spread"]["init"].values())
    # Held by every TP x DP rank of one stage; the tied embedding by those of its two stages.
    lay = got["layout"]
    for n, held in got["holders"].items():
        stages = 2 if lay["pp"] > 1 and n == "embed.weight" else 1
        assert held == lay["tp"] * lay["dp"] * stages, (n, held)


@pytest.mark.parametrize("name", MODEL_LAYOUTS)
def test_step1_loss_and_every_gradient_match(runs, name):
    ref, got = pair(runs, name)
    failures = step1_loss_failures(ref, got) + step1_grad_failures(ref, got)
    assert not failures, f"{name} differs from one process:\n" + "\n".join(failures)


@pytest.mark.parametrize("name", MODEL_LAYOUTS)
def test_replicas_agree(runs, name):
    """Every rank reports the same loss, and every copy of a gradient is the same numbers:
    data-parallel replicas after the reduction, TP replicas, the tied embedding's two copies
    after their all-reduce."""
    _, got = pair(runs, name)
    assert all(r == got["rank_losses"][0] for r in got["rank_losses"])
    drift = {n: d for n, d in got["spread"]["grads"].items() if d != 0.0}
    assert not drift, f"copies of a gradient differ (max |diff|): {drift}"


@pytest.mark.parametrize("name", MODEL_LAYOUTS)
def test_ten_steps_match(runs, name):
    ref, got = pair(runs, name)
    assert len(got["losses"]) == len(ref["losses"]) == RUNS[name].steps
    # Clipping engages at every step (so the global norm sets the updates), and the loss moves
    # by far more than the tolerance (so matching losses do check the updates).
    assert min(ref["grad_norms"]) > ref["grad_clip"]
    assert max(rel(x, ref["losses"][0]) for x in ref["losses"]) > 10 * LOSS_RTOL_STEPS
    failures = trajectory_failures(ref, got)
    assert not failures, "\n".join(failures)


# --- token weighting ----------------------------------------------------------------------


@pytest.mark.parametrize("name", TOKEN_SPLITS)
def test_token_weighted_split_gives_the_one_batch_gradient(runs, name):
    """BERT batches whose micro-batches score different numbers of tokens, split over
    accumulation steps and data-parallel ranks: the gradient is the one-batch gradient."""
    ref, got = pair(runs, name)
    counts = [c for rank in got["micro_tokens"] for c in rank]
    assert len(set(counts)) > 1, f"the split's micro-batches score equal token counts: {counts}"
    failures = grad_failures(ref, got, TOKEN_GRAD_RTOL)
    assert not failures, "\n".join(failures)


# --- negative controls --------------------------------------------------------------------


def control_run(runs, control: str, layout: str | None = None) -> tuple[dict, dict]:
    names = [n for n, r in RUNS.items() if r.control == control]
    name = next(n for n in names if layout is None or n.startswith(layout))
    return pair(runs, name)


def test_dropped_tied_gradient_reduction_is_caught(runs):
    """Pipeline: without the all-reduce between the embedding's two stage copies, the forward
    is untouched (step-1 loss passes) but the embedding's gradient misses one stage's part,
    and its copies drift apart."""
    ref, broken = control_run(runs, "no_tied_reduce")
    assert step1_loss_failures(ref, broken) == []
    failures = step1_grad_failures(ref, broken)
    assert any(f.startswith("embed.weight:") for f in failures), failures
    assert broken["spread"]["grads"]["embed.weight"] > 0
    assert trajectory_failures(ref, broken)


def test_dropped_data_parallel_reduction_is_caught(runs):
    ref, broken = control_run(runs, "no_dp_reduce")
    assert step1_loss_failures(ref, broken) == []
    assert step1_grad_failures(ref, broken)
    assert any(d > 0 for d in broken["spread"]["grads"].values())  # replicas disagree
    assert trajectory_failures(ref, broken)


def test_dropped_micro_batch_gradient_is_caught(runs):
    ref, broken = control_run(runs, "drop_micro")
    assert step1_loss_failures(ref, broken) == []
    assert step1_grad_failures(ref, broken)
    assert trajectory_failures(ref, broken)


def test_skipped_zero3_partition_update_is_caught(runs):
    """ZeRO-3: a rank that never updates its partition leaves step 1 intact (loss and
    gradients pass), so only the losses of the following steps can catch it, and do."""
    ref, broken = control_run(runs, "skip_partition_update")
    assert step1_loss_failures(ref, broken) == []
    assert step1_grad_failures(ref, broken) == []
    assert trajectory_failures(ref, broken)


@pytest.mark.parametrize("layout", ["tok.1x8", "tok.4x2", "tok.dp2x2"])
def test_mean_of_means_fails_the_token_check(runs, layout):
    ref, broken = control_run(runs, "mean_of_means", layout)
    assert grad_failures(ref, broken, TOKEN_GRAD_RTOL)


def test_every_control_is_exercised():
    used = {r.control for r in RUNS.values() if r.control}
    assert used == set(CONTROLS)


# --- rank placement -----------------------------------------------------------------------


@pytest.mark.parametrize("name", PIPELINES)
def test_megatron_and_deepspeed_place_ranks_alike(runs, name):
    """Every rank is in the same TP, PP and DP groups in megatron-core (which the model's TP
    layers and the loss use) as in DeepSpeed's pipeline grid (which sends activations, reduces
    the DP gradients and the tied copies), and both number it alike. Control: a topology of
    the same sizes with the pipeline axis fastest places ranks differently, and the same
    comparison sees it."""
    got = runs(name)
    lay = got["layout"]
    sizes = {"tp": lay["tp"], "pp": lay["pp"], "dp": lay["dp"]}
    differs_from_other_order = False
    for rank, g in enumerate(got["groups"]):
        for axis, size in sizes.items():
            assert rank in g["megatron"][axis] and len(g["megatron"][axis]) == size
            assert g["megatron"][axis] == g["deepspeed"][axis], (rank, axis, g)
            differs_from_other_order |= g["megatron"][axis] != g["other_order"][axis]
        assert g["layout"]["tp"] == g["megatron"]["tp"] and g["layout"]["dp"] == g["megatron"]["dp"]
        assert g["layout"]["ranks"] == g["deepspeed"]["ranks"], (rank, g)
    assert differs_from_other_order
