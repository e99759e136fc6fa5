"""Autograd-aware collectives over the sequence and vocabulary dimensions of a TP group.

megatron-core has these (gather_from_sequence_parallel_region, reduce_scatter_to_sequence_
parallel_region, gather_from_tensor_model_parallel_region), but they allocate their output with
`torch.cuda.current_device()` and so fail on a CPU build of torch. These are the same operations
allocated on the input's device, so CPU (gloo) works; the same code is meant for GPU (NCCL),
which the tests have never run.

Each function is the identity when the group has one rank, so TP=1 models pay nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_gather_first(x: torch.Tensor, group: Any) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((x.shape[0] * _size(group), *x.shape[1:]))
    dist.all_gather_into_tensor(out, x, group=group)
    return out


def _reduce_scatter_first(x: torch.Tensor, group: Any) -> torch.Tensor:
    n = _size(group)
    if x.shape[0] % n:
        raise ValueError(f"cannot split {x.shape[0]} positions over {n} tensor-parallel ranks")
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x, group=group)
    return out


class _GatherSequence(torch.autograd.Function):
    """Forward: all-gather shards of the sequence. Backward: reduce-scatter, because every rank
    feeds the full sequence into its own slice of a tensor-parallel layer, so the gradient of
    each position is the sum over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _all_gather_first(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_first(grad, ctx.group), None


class _ReduceScatterSequence(torch.autograd.Function):
    """Forward: sum the partial outputs of a row-parallel layer and keep this rank's shard of
    the sequence. Backward: all-gather (each rank's partial output saw the full gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter_first(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_first(grad, ctx.group), None


class _GatherLastDim(torch.autograd.Function):
    """Forward: concatenate every rank's slice of the last dimension (vocabulary logits).
    Backward: keep this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        n = _size(group)
        gathered = _all_gather_first(x.unsqueeze(0), group)  # [n, ...]
        return torch.cat(gathered.unbind(0), dim=-1) if n > 1 else x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n, r = _size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(n, dim=-1)[r].contiguous(), None


def gather_sequence(x_SBD: torch.Tensor, group: Any) -> torch.Tensor:
    """[s/tp, b, d] shards -> [s, b, d]; gradients reduce-scattered."""
    return x_SBD if _size(group) == 1 else _GatherSequence.apply(x_SBD, group)


def reduce_scatter_sequence(x_SBD: torch.Tensor, group: Any) -> torch.Tensor:
    """Partial sums [s, b, d] -> this rank's summed shard [s/tp, b, d]."""
    return x_SBD if _size(group) == 1 else _ReduceScatterSequence.apply(x_SBD, group)


def gather_last_dim(x: torch.Tensor, group: Any) -> torch.Tensor:
    """[..., v/tp] slices -> [..., v]."""
    return x if _size(group) == 1 else _GatherLastDim.apply(x, group)


class _GatherReplicated(torch.autograd.Function):
    """Forward: all-gather shards of the sequence into a tensor that every rank then uses
    whole and alike (a replicated computation, such as a mixture-of-experts layer whose
    routing runs on every rank). Backward: keep this rank's shard, since every rank already
    holds the full, identical gradient (summing them would count it tp times)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _all_gather_first(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n, r = _size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(n, dim=0)[r].contiguous(), None


class _SplitSequence(torch.autograd.Function):
    """Forward: keep this rank's shard of a replicated [s, b, d] tensor. Backward: all-gather,
    each rank contributing the gradient of its own shard."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        n, r = _size(group), dist.get_rank(group)
        if x.shape[0] % n:
            raise ValueError(f"cannot split {x.shape[0]} positions over {n} tensor-parallel ranks")
        return x.chunk(n, dim=0)[r].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_first(grad, ctx.group), None


def gather_sequence_replicated(x_SBD: torch.Tensor, group: Any) -> torch.Tensor:
    """[s/tp, b, d] shards -> [s, b, d] for a computation replicated on every rank; the
    gradient of this rank's shard is kept, not summed."""
    return x_SBD if _size(group) == 1 else _GatherReplicated.apply(x_SBD, group)


def split_sequence(x_SBD: torch.Tensor, group: Any) -> torch.Tensor:
    """A replicated [s, b, d] -> this rank's shard [s/tp, b, d]; gradients all-gathered."""
    return x_SBD if _size(group) == 1 else _SplitSequence.apply(x_SBD, group)
