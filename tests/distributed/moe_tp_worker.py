"""Run under torchrun by tests/distributed/test_moe_tensor_parallel.py: a tiny Switch GPT trained
5 fp32 steps by DeepSpeed engines, at the layout the launch gives, with router jitter and random
token selection on and a capacity that drops tokens.

usage: torchrun --nproc-per-node=N tests/distributed/moe_tp_worker.py OUT.json TP [DATASET TMPDIR]

  TP=1, 2 ranks (the references): ref_same: ep=1, both data-parallel ranks given the same
      batches and random streams, which is the one-rank run (the gradient mean of two equal
      gradients is that gradient exactly); ref_dp2: ep=2, each rank its own batches.
  TP=2, 2 ranks (dp=1, ep=1): tp2; tp2_sp (sequence parallelism); two negative controls:
      tp2_rank_streams, router jitter and token selection drawn from a different stream on
      each TP rank, so the TP ranks of the replicated experts route differently;
      tp2_sp_summed_gather, the sequence gathered before the experts with the backward of a
      tensor-parallel layer's gather (gradients summed over TP ranks, not kept). With a
      dataset: exact resume through the trainer (moe_worker.resume_runs: 20 steps against
      10 + checkpoint + 10, per rank); the trained engine's logits and its checkpoint,
      which the test loads the way pretrain-generate does.
  TP=2, 4 ranks (dp=2, ep=2): tp2_ep2, tp2_ep2_sp, tp2_ep2_zero2 (losses only); negative
      control tp2_ep2_deepspeed_groups: DeepSpeed's own expert groups (consecutive global ranks:
      an expert-parallel group is a TP group).
  Clipping (TP=1, 2 ranks, dp=2): clip_ep1, clip_ep2 (pretrain.expert_parallel's exact norm),
      and the negative control clip_ep2_deepspeed_norm (DeepSpeed's mean of per-rank norms);
      the per-step gradient norms too.

For each run, rank 0 writes the per-step losses (mean over data-parallel ranks), every step-1
gradient as a full tensor (TP shards gathered; experts by their ep=1 name), the largest
difference between TP ranks' copies of a replicated parameter's gradient (experts included),
and the largest fraction of routes an MoE layer dropped on rank 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from moe_worker import global_name, resume_runs
from tp_worker import full_tensors

from pretrain import distributed
from pretrain.config import Config, ModelConfig
from pretrain.engine import build_engine, build_model_for, grad_norm_now
from pretrain.models.moe import moe_statistics
from pretrain.steps import add_loss_tokens

STEPS = 5
CLIP = 0.05  # below every step's gradient norm: clipping engages each step
MODEL = ModelConfig(
    n_layers=2,
    d_model=32,
    n_heads=4,
    seq_len=16,
    vocab_size=128,
    # Dropout masks legitimately differ between TP layouts (sharded activations draw from
    # per-TP-rank streams); the router's jitter and token selection draw from the default
    # generator, which is the same on every TP rank, so they stay on.
    dropout=0.0,
    moe_experts=4,
    moe_every=1,
    # 64 tokens per micro-batch: ceil(64 / 4 * 1.05) = 17 slots; a busy expert drops tokens.
    moe_capacity_factor=1.05,
    moe_min_capacity=4,
    moe_jitter=0.01,
    moe_random_token_selection=True,
)


def config(tp: int, ep: int, sp: bool = False, zero_stage: int = 0, clip: float = 0.0) -> Config:
    cfg = Config(model=MODEL)
    cfg.parallel = dataclasses.replace(
        cfg.parallel,
        tp=tp,
        ep=ep,
        sequence_parallel=sp,
        zero_stage=zero_stage,
        micro_batch_size=4,
    )
    cfg.optim = dataclasses.replace(cfg.optim, lr=1e-2, warmup_steps=0, grad_clip=clip)
    return cfg.validate()


def batch(step: int, data_rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + data_rank)
    seq = torch.randint(0, MODEL.vocab_size, (4, MODEL.seq_len + 1), generator=g)
    return {"tokens": seq[:, :-1], "targets": seq[:, 1:]}


def forget_expert_groups(ep: int) -> None:
    from deepspeed.utils import groups

    for registry in (
        groups._EXPERT_PARALLEL_GROUP,
        groups._EXPERT_PARALLEL_GROUP_RANKS,
        groups._EXPERT_DATA_PARALLEL_GROUP,
        groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
    ):
        registry.pop(f"ep_size_{ep}", None)


@contextlib.contextmanager
def broken(control: str | None, ep: int):
    """The negative controls that replace a piece of the TP composition for one run."""
    import pretrain.expert_parallel as expert_parallel
    import pretrain.models.moe as moe
    from pretrain.models import collectives

    saved = (
        expert_parallel.create_expert_groups,
        moe.gather_sequence_replicated,
        expert_parallel.clip_expert_parallel,
    )
    if control == "deepspeed_groups":
        forget_expert_groups(ep)  # DeepSpeed's MoE layers create theirs at engine start
        expert_parallel.create_expert_groups = lambda ep, layout: None
    if control == "summed_gather":
        moe.gather_sequence_replicated = collectives.gather_sequence
    if control == "deepspeed_norm":  # DeepSpeed's mean of per-rank norms
        expert_parallel.clip_expert_parallel = lambda engine, limit: None
    try:
        yield
    finally:
        (
            expert_parallel.create_expert_groups,
            moe.gather_sequence_replicated,
            expert_parallel.clip_expert_parallel,
        ) = saved
        if control == "deepspeed_groups":
            forget_expert_groups(ep)


def train(
    layout, ep: int, *, sp=False, same_data=False, zero_stage=0, clip=0.0, control=None
) -> dict:
    with broken(control, ep):
        return train_run(layout, ep, sp, same_data, zero_stage, clip, control)


def train_run(layout, ep, sp, same_data, zero_stage, clip, control) -> dict:
    cfg = config(layout.tp_size, ep, sp, zero_stage, clip)
    distributed.seed_all(1234)
    model = build_model_for(cfg, layout)
    data_rank = 0 if same_data else layout.dp_rank
    # Jitter and token selection: one stream per data-parallel rank, alike on its TP ranks.
    distributed.seed_all(99 + data_rank + (7 * layout.tp_rank if control == "rank_streams" else 0))
    engine, _ = build_engine(cfg, layout, model)
    ep_rank, local = layout.dp_rank % ep, MODEL.moe_experts // ep
    losses, grads, spread, norms = [], {}, 0.0, []
    for step in range(STEPS):
        micro = [batch(step, data_rank)]
        add_loss_tokens(micro, layout)
        loss = engine(**micro[0])
        engine.backward(loss)
        if step == 0 and zero_stage == 0:
            local_grads = {n: p.grad for n, p in engine.module.named_parameters()}
            full, spreads = full_tensors(engine.module, layout, local_grads)
            grads = {global_name(n, ep_rank, local): g for n, g in full.items()}
            spread = max(spreads.values())
        if clip:  # the norm, and clipping with it, as the trainer takes them (pretrain.steps)
            norms.append(grad_norm_now(engine))
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total, group=layout.dp_group)
        losses.append(total.item() / layout.dp_size)
    gathered: list = [None] * layout.world_size
    dist.all_gather_object(gathered, {k: v.flatten().tolist() for k, v in grads.items()})
    merged: dict[str, list[float]] = {}
    for rank_grads in reversed(gathered):  # rank 0's copy of replicated parameters wins
        merged.update(rank_grads)
    spreads: list = [None] * layout.world_size
    dist.all_gather_object(spreads, spread)
    stats = moe_statistics(engine.module)  # this rank's routing over the 5 steps
    dropped = max(v for k, v in stats.items() if k.endswith("/dropped"))
    return {
        "losses": losses,
        "grads": merged,
        "tp_spread": max(spreads),
        "dropped": dropped,
        "norms": norms,
    }


def main() -> None:
    out, tp, more = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    layout = distributed.setup(config(tp, 1))
    if tp == 1:
        runs = {
            "ref_same": lambda: train(layout, 1, same_data=True),
            "ref_dp2": lambda: train(layout, 2),
            "clip_ep1": lambda: train(layout, 1, clip=CLIP),
            "clip_ep2": lambda: train(layout, 2, clip=CLIP),
            "clip_ep2_deepspeed_norm": lambda: train(
                layout, 2, clip=CLIP, control="deepspeed_norm"
            ),
        }
    elif layout.dp_size == 1:
        runs = {
            "tp2": lambda: train(layout, 1),
            "tp2_sp": lambda: train(layout, 1, sp=True),
            "tp2_rank_streams": lambda: train(layout, 1, control="rank_streams"),
            "tp2_sp_summed_gather": lambda: train(layout, 1, sp=True, control="summed_gather"),
        }
    else:
        runs = {
            "tp2_ep2": lambda: train(layout, 2),
            "tp2_ep2_sp": lambda: train(layout, 2, sp=True),
            "tp2_ep2_zero2": lambda: train(layout, 2, zero_stage=2),
            "tp2_ep2_deepspeed_groups": lambda: train(layout, 2, control="deepspeed_groups"),
        }
    results = {name: run() for name, run in runs.items()}
    if more and tp > 1 and layout.dp_size == 1:
        dataset, tmp = more[0], Path(more[1])
        resume = resume_runs(layout, dataset, tmp, ["parallel.tp=2", "parallel.ep=1"], False)
        per_rank: list = [None] * layout.world_size
        dist.all_gather_object(per_rank, resume)
        results["resume_per_rank"] = per_rank
    if layout.is_main:
        out.write_text(json.dumps(results))
    distributed.teardown()


if __name__ == "__main__":
    main()
