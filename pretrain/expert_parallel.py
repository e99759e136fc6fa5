"""Mixture-of-experts layers composed with tensor parallelism, as DeepSpeed runs them.

The design (docs/moe.md): experts are replicated over the tensor-parallel group. Every TP rank
holds the same experts (expert-parallel rank = data-parallel rank % ep, as attach_experts
places them), routes the same tokens (the block's MLP input is the same on every TP rank; under
sequence parallelism MoEFeedForward gathers the sequence first) and computes every routed
token, so each TP rank ends the backward pass with the complete expert gradients and nothing
has to be summed over TP.

DeepSpeed would do two things differently, both undone here before and after the engine is
built:

- its expert groups (built when the engine meets the MoE layers) come from consecutive global
  ranks, which under megatron's layout (TP ranks adjacent) puts a TP group into one
  expert-parallel group: TP ranks that hold the same experts would receive other experts'
  tokens, and the expert-data-parallel reduction would run across TP. `create_expert_groups`
  creates them first from megatron's layout: an expert-parallel group is ep consecutive
  data-parallel ranks of one TP rank, an expert-data-parallel group the data-parallel ranks of
  one TP rank that hold the same experts (DeepSpeed's own `_get_expert_parallel_ranks`);
- its MOELayer, seeing TP > 1 in `deepspeed.utils.groups.mpu`, splits every expert's capacity
  slots over the TP ranks and all-gathers the results, an all-gather into a flat buffer that
  torch's gloo backend rejects ("invalid tensor size"), so it cannot run on a CPU. The engine
  sets that `mpu` to ours; `ExpertsMPU`, set in its place once the engine is built, is the same
  layout with tensor-parallel size 1 for what reads it (the MoE layers' token split and
  capacity rounding; the data-parallel group is unchanged).

`clip_expert_parallel` is the exact gradient norm (and clipping) with experts sharded over
expert-parallel ranks, where DeepSpeed averages per-rank norms (fp32 at ZeRO-0; any TP).

The cost of replication: the expert FLOPs and the all-to-all volume are not divided by TP, and
each TP rank keeps its own copy of the expert optimizer states (ZeRO partitions them over the
expert-data-parallel group, which holds one TP rank).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from pretrain.distributed import DeepSpeedMPU, Layout


class ExpertsMPU(DeepSpeedMPU):
    """The model-parallel unit DeepSpeed's MoE layers read (deepspeed.utils.groups.mpu): the
    run's layout, with experts that see no tensor parallelism (see the module docstring).
    The engine keeps the real one for gradient norms, clipping and checkpoints."""

    def get_tensor_model_parallel_world_size(self) -> int:
        return 1

    def get_tensor_model_parallel_rank(self) -> int:
        return 0


def create_expert_groups(ep: int, layout: Layout) -> None:
    """DeepSpeed's expert-parallel and expert-data-parallel groups for `ep` under megatron's
    layout, registered where DeepSpeed's MoE layers look them up (they then create none).
    Collective: every rank calls it, before the engine is built. At TP=1 DeepSpeed's own
    groups are these already, and are left to it."""
    if layout.tp_size == 1:
        return
    from deepspeed.utils import groups

    name = f"ep_size_{ep}"
    if name not in groups._get_expert_parallel_group_dict():
        ep_lists, edp_lists = groups._get_expert_parallel_ranks(
            layout.world_size, layout.tp_size, ep, layout.pp_size
        )
        # DeepSpeed offers no call that takes given groups; its registries are these dicts.
        for lists, by_name, ranks_by_name in (
            (ep_lists, groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS),
            (
                edp_lists,
                groups._EXPERT_DATA_PARALLEL_GROUP,
                groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
            ),
        ):
            for ranks in lists:
                group = dist.new_group(ranks)  # every rank creates every group, in order
                if layout.rank in ranks:
                    by_name[name], ranks_by_name[name] = group, ranks
    check_expert_groups(ep, layout)


def check_expert_groups(ep: int, layout: Layout) -> None:
    """The invariants the placement of experts relies on: this rank's expert-parallel group
    is one TP rank's, and its position in it is dp_rank % ep (attach_experts); its
    expert-data-parallel group is one TP rank's too."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep}"
    ep_ranks = list(groups._get_expert_parallel_group_ranks(name))
    edp_ranks = list(groups._get_expert_data_parallel_group_ranks(name))
    position = groups._get_expert_parallel_rank(name)
    same_tp = {r % layout.tp_size for r in ep_ranks + edp_ranks} == {layout.tp_rank}
    if not same_tp or position != layout.dp_rank % ep:
        raise RuntimeError(
            f"rank {layout.rank}: DeepSpeed's expert groups for ep={ep} (expert-parallel "
            f"{ep_ranks}, position {position}; expert-data-parallel {edp_ranks}) do not follow "
            f"megatron's layout (tp={layout.tp_size}, dp rank {layout.dp_rank}): experts would "
            f"receive other experts' tokens"
        )


def use_replicated_experts(engine: Any, layout: Layout) -> None:
    """After deepspeed.initialize: the MoE layers' view of the layout (ExpertsMPU)."""
    if layout.tp_size == 1:
        return
    from deepspeed.utils import groups

    if groups.mpu is not engine.mpu:
        raise RuntimeError("DeepSpeed's groups.mpu is not the engine's: cannot replace it")
    groups.mpu = ExpertsMPU(layout)


def clip_expert_parallel(engine: Any, limit: float) -> float | None:
    """The exact global gradient norm of a model whose experts are sharded over
    expert-parallel ranks, and the gradients clipped to `limit` with it (fp32 at ZeRO-0, where
    pretrain.engine clips); None without expert parallelism, where DeepSpeed's norm is exact.

    DeepSpeed's clip_grad_norm_ averages each data-parallel rank's own norm, and at ep > 1
    those ranks hold different experts. Here every gradient counts once: TP-sharded ones on
    every TP rank, replicated ones (experts included) on TP rank 0; each expert group's
    squares are summed over its expert-parallel group (whose ranks hold the other experts),
    the rest are the same on every data-parallel rank. Call after the backward pass's
    data-parallel reduction."""
    import torch
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.utils import is_model_parallel_parameter
    from deepspeed.utils import groups

    layout: Layout = engine.mpu.layout
    params = [p for p in engine.module.parameters() if p.grad is not None]
    # Decided from the model, the same on every rank: the collectives below must match.
    names = sorted({p.group_name for p in params if is_moe_param(p)})
    sharded = [n for n in names if groups._get_expert_parallel_world_size(n) > 1]
    if not sharded:
        return None
    zero = torch.zeros((), dtype=torch.float64, device=layout.device)
    total, experts = zero.clone(), {n: zero.clone() for n in sharded}
    for p in params:
        if layout.tp_rank != 0 and not is_model_parallel_parameter(p):
            continue
        sq = p.grad.detach().double().pow(2).sum()
        if is_moe_param(p) and p.group_name in experts:
            experts[p.group_name] += sq
        else:
            total += sq
    for name in sharded:
        dist.all_reduce(experts[name], group=groups._get_expert_parallel_group(name))
        total += experts[name]
    if engine.mpu.get_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=engine.mpu.get_model_parallel_group())
    norm = float(total.sqrt())
    coef = min(1.0, limit / (norm + 1e-6))  # DeepSpeed's clip factor
    if coef < 1.0:
        for p in params:
            p.grad.detach().mul_(coef)
    return norm
