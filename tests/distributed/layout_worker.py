"""Run under torchrun by test_3d_parallel.py: trains each named run of layout_cases.RUNS whose
world size is this launch's, in sequence, and saves what the test compares as full tensors
under the one-process model's parameter names.

usage: torchrun --nproc-per-node=N layout_worker.py OUT_DIR RUN [RUN ...]

One launch covers every run of a world size: torch.distributed starts once, and megatron-core's
groups are rebuilt (destroy_model_parallel, then pretrain.distributed.setup) whenever a run's
tp/pp differ from the previous one's. Every run goes through the real pieces, in the order
pretrain.train.run uses them: seed, pretrain.engine.build_model_for (a PipelineModule stage when
pp > 1, a zero.Init-partitioned model at ZeRO-3), the dropout seeds, build_engine, Trainer.fit
(token-weighted losses via add_loss_tokens, DataParallelSteps or PipelineSteps). Each rank
gets its share of the same global batch of 8 sequences per step.

For each run rank 0 writes OUT_DIR/<run>.pt holding:
  init        {one-process param name: full tensor} after the engine is built
  grads       the same for the step-1 gradients, complete (reduced over DP and the tied copies,
              accumulated over micro-batches) and not yet clipped
  spread      {"init"|"grads": {name: max |copy - first copy|}} over every copy of a parameter in
              the world: data-parallel replicas, tensor-parallel replicas, tied stage copies
  holders     {name: number of ranks holding it} (each name must be held by tp*dp ranks, the
              tied embedding by both its stages)
  losses, rank_losses, grad_norms, grad_clip
  groups      pp > 1: per rank, the ranks of its TP, PP and DP groups as megatron-core built
              them, as DeepSpeed's pipeline grid built them, and as a topology with another
              axis order would (the placement check's negative control)
A run that raises is saved as {"error": traceback} instead.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from layout_cases import GLOBAL_BATCH, RUNS, Run
from tp_worker import BATCHES, Recorder, markov, unshard

from pretrain import distributed
from pretrain.config import Config, load_config
from pretrain.distributed import Layout, seed_all
from pretrain.engine import build_engine, build_model_for
from pretrain.models.layers import scored_tokens
from pretrain.tracking import Tracker
from pretrain.trainer import Trainer

DATA_SEED = 4242


# --- batches --------------------------------------------------------------------------------


def varied_mlm_batch(gen: torch.Generator, b: int, L: int, vocab: int) -> dict[str, torch.Tensor]:
    """Masked-LM batches whose sequences score very different numbers of tokens (sequence i
    masks about 5% + 11% * i of its positions), so micro-batches of one step have different
    loss-token counts and a mean of per-micro-batch means weighs tokens unequally."""
    mask_id = 1  # as tp_worker.mlm_batch; no padding, so every position can be scored
    original = markov(gen, b, L, vocab)
    rate = 0.05 + 0.11 * torch.arange(b, dtype=torch.float32)[:, None]
    chosen = torch.rand(b, L, generator=gen) < rate
    chosen[:, 0] = True
    return {
        "tokens": original.masked_fill(chosen, mask_id),
        "targets": original,
        "loss_mask": chosen.float(),
        "padding_mask": torch.ones(b, L, dtype=torch.bool),
    }


MAKERS = {**BATCHES, "mlm-varied": varied_mlm_batch}


class LayoutBatches:
    """The loader interface the Trainer uses: step i's global batch depends only on
    (DATA_SEED, i); this data-parallel rank takes its contiguous share, cut into `accum`
    micro-batches of `micro` sequences."""

    def __init__(self, run: Run, cfg: Config, layout: Layout):
        self.make, self.cfg, self.layout, self.run = MAKERS[run.family], cfg, layout, run
        self.global_batch = GLOBAL_BATCH
        self.step = 0
        self.first_step_tokens: list[int] = []  # scored tokens of each micro-batch of step 1

    @property
    def tokens_per_sequence(self) -> int:
        return self.cfg.model.seq_len

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(DATA_SEED * 1000 + self.step)
        self.step += 1
        m = self.cfg.model
        full = self.make(gen, GLOBAL_BATCH, m.seq_len, m.vocab_size)
        share = GLOBAL_BATCH // self.layout.dp_size
        start = self.layout.dp_rank * share
        micro = [
            {
                k: v[start + j * self.run.micro : start + (j + 1) * self.run.micro]
                for k, v in full.items()
            }
            for j in range(self.layout.grad_accum)
        ]
        if self.step == 1:
            self.first_step_tokens = [scored_tokens(b) for b in micro]
        return micro

    # The rest of the loader protocol (pretrain.trainer.Batches): the trainer snapshots the
    # position before each step so that a skipped or stopped step can rewind it.
    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["consumed"])


# --- taking the step-1 gradients ------------------------------------------------------------


class BoundaryGradTap:
    """A DeepSpeedEngine with one addition: a copy of every full gradient at the first
    accumulation boundary (after the backward that reduces over data parallelism, before
    clipping and the optimizer); deepspeed.utils.safe_get_full_grad assembles ZeRO-1/2/3's
    partitioned gradients. Two of the controls act here too."""

    def __init__(self, engine: Any, control: str | None):
        self._engine, self.control = engine, control
        self.grads: dict[str, torch.Tensor] | None = None
        if control == "mean_of_means":
            # On the module, so that it acts whether the runner calls the engine or, where
            # DeepSpeed's wrappers only keep books (engine.runs_direct), the module itself.
            def own_mean(module, args, kwargs):
                kwargs.pop("loss_tokens")  # the model then returns its micro-batch's mean
                return args, kwargs

            engine.module.register_forward_pre_hook(own_mean, with_kwargs=True)

    def __call__(self, **batch: Any) -> Any:
        return self._engine(**batch)

    def capture(self) -> None:
        from deepspeed.utils import safe_get_full_grad

        engine = self._engine
        if engine.is_gradient_accumulation_boundary() and self.grads is None:
            self.grads = {
                n: safe_get_full_grad(p).detach().clone()
                for n, p in engine.module.named_parameters()
            }

    def step(self) -> None:
        engine = self._engine
        boundary = engine.is_gradient_accumulation_boundary()
        self.capture()  # unless grad_norm_now took them first (below)
        if not boundary and self.control == "drop_micro":
            for p in engine.module.parameters():  # ZeRO-0 accumulates in p.grad
                p.grad.zero_()
        engine.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def _tap_before_clipping() -> None:
    """At ZeRO-0 fp32 the trainer clips the gradients itself (pretrain.engine.grad_norm_now,
    before engine.step): take them there, before clipping, as the pipeline path does."""
    import pretrain.engine as E

    norm_now = E.grad_norm_now

    def grad_norm_now(engine: Any) -> float:
        if isinstance(engine, BoundaryGradTap):
            engine.capture()
        return norm_now(engine)

    E.grad_norm_now = grad_norm_now


# --- full tensors under one-process names ---------------------------------------------------


def full_tensors(
    values: dict[str, torch.Tensor],
    params: dict[str, torch.nn.Parameter],
    names: dict[str, str],
    layout: Layout,
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, int]]:
    """On rank 0: ({one-process name: full tensor}, {name: max deviation of any copy from the
    first}, {name: ranks holding it}). TP shards are gathered along their partition dim (the
    shards of one stage sit in one megatron TP group); then every rank's tensors are collected
    and stitched: a pipeline stage contributes its own parameters."""
    local, spread = {}, {}
    for name, value in values.items():
        p = params[name]
        v = value.detach().float().contiguous()
        gathered = [torch.empty_like(v) for _ in range(layout.tp_size)]
        dist.all_gather(gathered, v, group=layout.tp_group)
        if getattr(p, "tensor_model_parallel", False):
            local[names[name]] = unshard(
                gathered, p.partition_dim, getattr(p, "partition_stride", 1)
            )
        else:
            local[names[name]] = gathered[0]
    everyone: list[Any] = [None] * layout.world_size
    dist.all_gather_object(everyone, local)
    full, holders = {}, {}
    for rank_values in everyone:
        for name, t in rank_values.items():
            if name not in full:
                full[name], spread[name], holders[name] = t, 0.0, 0
            spread[name] = max(spread[name], float((t - full[name]).abs().max()))
            holders[name] += 1
    return full, spread, holders


def weights(model: torch.nn.Module, zero: int) -> dict[str, torch.Tensor]:
    if zero != 3:
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


# --- rank placement ---------------------------------------------------------------------------


def placement(engine: Any, layout: Layout) -> dict[str, Any]:
    """This rank's groups as megatron-core built them and as DeepSpeed's pipeline grid did."""
    from deepspeed.runtime.pipe.topology import ProcessTopology
    from megatron.core import parallel_state as ps

    def ranks(group: Any) -> list[int]:
        return sorted(dist.get_process_group_ranks(group))

    grid, me = engine.grid, dist.get_rank()
    # Negative control: the same sizes with the pipeline axis fastest; a placement check that
    # could not tell orders apart would pass it too.
    other = ProcessTopology(
        axes=["model", "data", "pipe"], dims=[layout.tp_size, layout.dp_size, layout.pp_size]
    )

    def other_group(axis: str) -> list[int]:
        return sorted(next(g for g in other.get_axis_comm_lists(axis) if me in g))

    return {
        "megatron": {
            "tp": ranks(ps.get_tensor_model_parallel_group()),
            "pp": ranks(ps.get_pipeline_model_parallel_group()),
            "dp": ranks(ps.get_data_parallel_group()),
        },
        "layout": {
            "tp": ranks(layout.tp_group),
            "dp": ranks(layout.dp_group),
            "ranks": [layout.tp_rank, layout.pp_rank, layout.dp_rank],
        },
        "deepspeed": {
            "tp": ranks(grid.get_slice_parallel_group()),
            "pp": ranks(grid.get_pipe_parallel_group()),
            "dp": ranks(grid.get_data_parallel_group()),
            "ranks": [
                grid.get_slice_parallel_rank(),
                grid.get_stage_id(),
                grid.get_data_parallel_id(),
            ],
        },
        "other_order": {
            "tp": other_group("model"),
            "pp": other_group("pipe"),
            "dp": other_group("data"),
        },
    }


# --- one run --------------------------------------------------------------------------------


def apply_control(run: Run, engine: Any, layout: Layout) -> None:
    """Break the run as layout_cases.CONTROLS says (the tap handles drop_micro and
    mean_of_means)."""
    if run.control == "no_tied_reduce":
        # PipelineEngine._exec_reduce_tied_grads all-reduces exactly these (weight, group) pairs.
        if not engine.module.get_tied_weights_and_groups():
            raise RuntimeError("no tied weight to break: the control would test nothing")
        engine.module.get_tied_weights_and_groups = lambda: []
    elif run.control == "no_dp_reduce":
        engine.enable_backward_allreduce = False
    elif run.control == "skip_partition_update" and layout.dp_rank == 1:
        engine.optimizer.optimizer.step = lambda *args, **kwargs: None


def train_one(name: str, layout: Layout | None) -> tuple[dict[str, Any], Layout]:
    from megatron.core import parallel_state as ps

    from pretrain.models.pipeline import model_names
    from pretrain.models.rng import seed_model_rng

    t0 = time.perf_counter()
    run = RUNS[name]
    cfg = load_config(None, run.overrides())
    if layout is None or (layout.tp_size, layout.pp_size) != (run.tp, run.pp):
        if layout is not None:
            ps.destroy_model_parallel()
        layout = distributed.setup(cfg)
    else:
        layout = distributed.Layout(
            **{**vars(layout), "grad_accum": cfg.parallel.layout(layout.world_size)[1]}
        )
    assert (layout.dp_size, layout.grad_accum) == (run.dp, run.accum), name

    # As pretrain.train.run: the same global seed before the model on every rank and layout,
    # then per-rank dropout streams (dropout is 0 here).
    seed_all(cfg.run.seed)
    model = build_model_for(cfg, layout)
    seed_all(cfg.run.seed + 1000 * layout.dp_rank + 100 * layout.pp_rank + 1)
    seed_model_rng(model, cfg.run.seed, layout.dp_rank, layout.pp_rank, layout.tp_rank)
    engine, scheduler = build_engine(cfg, layout, model)
    apply_control(run, engine, layout)

    pipeline = layout.pp_size > 1
    module = engine.module
    names = model_names(module) if pipeline else {n: n for n, _ in module.named_parameters()}
    params = dict(module.named_parameters())
    init = weights(module, run.zero)

    grads: dict[str, torch.Tensor] = {}
    if pipeline:

        def take(e: Any) -> None:
            if not grads:
                grads.update({n: p.grad.detach().clone() for n, p in e.module.named_parameters()})

        engine.before_optimizer_step.append(take)
        driven = engine
    else:
        driven = BoundaryGradTap(engine, run.control)
    recorder = Recorder()
    batches = LayoutBatches(run, cfg, layout)
    trainer = Trainer(
        cfg,
        layout,
        driven,
        scheduler,
        batches,
        None,
        Tracker(cfg, layout.is_main),
        hooks=[recorder],
    )
    trainer.fit()
    if not pipeline:
        grads = driven.grads or {}
    if set(grads) != set(params):
        raise RuntimeError(f"gradients taken for {len(grads)} of {len(params)} parameters")

    init_full, init_spread, holders = full_tensors(init, params, names, layout)
    grad_full, grad_spread, _ = full_tensors(grads, params, names, layout)
    losses = [m["loss"] for m in recorder.metrics]
    rank_losses: list[Any] = [None] * layout.world_size
    dist.all_gather_object(rank_losses, losses)
    micro_tokens: list[Any] = [None] * layout.world_size
    dist.all_gather_object(micro_tokens, batches.first_step_tokens)
    groups: list[Any] = [None] * layout.world_size
    dist.all_gather_object(groups, placement(engine, layout) if pipeline else None)
    return {
        "run": name,
        "init": init_full,
        "grads": grad_full,
        "spread": {"init": init_spread, "grads": grad_spread},
        "holders": holders,
        "losses": losses,
        "rank_losses": rank_losses,
        "grad_norms": [m["grad_norm"] for m in recorder.metrics],
        "grad_clip": cfg.optim.grad_clip,
        "groups": groups,
        "micro_tokens": micro_tokens,
        "layout": {
            "tp": layout.tp_size,
            "pp": layout.pp_size,
            "dp": layout.dp_size,
            "accum": layout.grad_accum,
        },
        "seconds": time.perf_counter() - t0,
    }, layout


def main() -> None:
    out_dir, names = Path(sys.argv[1]), sys.argv[2:]
    # A hung collective shows where it hangs: `kill -USR1 <pid>` prints every thread's stack.
    faulthandler.register(signal.SIGUSR1)
    _tap_before_clipping()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = None
    for name in names:
        assert RUNS[name].world == world, f"{name} needs {RUNS[name].world} processes"
        try:
            record, layout = train_one(name, layout)
        except Exception:
            # Recorded for the test to show, and the launch ends: a pipeline stage can fail
            # alone, and its partner would wait for it in the next collective for ever
            # (torchrun stops the other ranks when one exits with an error).
            print(f"rank {os.environ.get('RANK')}: run {name} failed", file=sys.stderr)
            traceback.print_exc()
            sys.exit(1)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(record, out_dir / f"{name}.pt")
            print(f"{name}: {record['seconds']:.1f} s", flush=True)
    distributed.teardown()


if __name__ == "__main__":
    main()
