"""Parallelism applied to a built model from outside, in one place.

Under sequence parallelism some parameters are replicated across the tensor-parallel group yet
see only this rank's shard of the sequence (norm weights and biases, row-parallel biases, the
learned position table, BERT's head transform); the layers flag them with
`param.sequence_parallel = True`, as megatron does. Their gradient is the sum of the ranks'
partial gradients. megatron's DDP sums them; DeepSpeed knows nothing of them, so a hook on each
such parameter all-reduces its gradient over the TP group as it is produced, before DeepSpeed's
own hooks see it (any ZeRO stage, any number of accumulation steps).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def sequence_parallel_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)]


def _sum_over_group(group: Any):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # the incoming tensor may be shared with other nodes
        dist.all_reduce(grad, group=group)
        return grad

    return hook


def parallelize(model: nn.Module, tp_group: Any, tp_size: int, sequence_parallel: bool) -> None:
    """Register the sequence-parallel gradient hooks (nothing to do without sequence
    parallelism or at TP=1). Idempotent."""
    if not sequence_parallel or tp_size == 1:
        return
    for _, p in sequence_parallel_params(model):
        if not getattr(p, "_sequence_parallel_hook", False):
            p.register_hook(_sum_over_group(tp_group))
            p._sequence_parallel_hook = True
