"""AdamW parameter groups and learning-rate schedules.

Schedules are pure functions of the step, wrapped in a LambdaLR that DeepSpeed steps once per
optimizer step and stores in its checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pretrain.config import OptimConfig

# Position tables are matrices but not weights of a linear map: shrinking them toward zero
# only blurs positions (learned absolute embeddings, T5's relative-position bias tables).
POSITION_TABLES = ("pos_embed", "enc_bias", "dec_bias")


def decayed(name: str, shape: tuple[int, ...]) -> bool:
    """Whether weight decay applies to a parameter (its group in param_groups)."""
    table = any(part in POSITION_TABLES for part in name.split("."))
    return len(shape) >= 2 and not table


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norm gains and position tables are left undecayed, as in
    GPT-2/3 and Megatron."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # A parameter built under ZeRO-3's zero.Init holds an empty tensor; its shape is ds_shape.
        (decay if decayed(name, getattr(p, "ds_shape", p.shape)) else no_decay).append(p)
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay", "decay": True},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay", "decay": False},
    ]
    if any(not getattr(p, "allreduce", True) for g in groups for p in g["params"]):
        # Expert parameters (DeepSpeed marks them allreduce=False) are reduced over their
        # expert-data-parallel group, not the whole data-parallel group: DeepSpeed and ZeRO
        # want them in groups of their own, one per expert-parallel size, marked 'moe'.
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def lr_lambda(cfg: OptimConfig, train_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at a step: linear warmup, then the chosen decay.

    `step` counts optimizer steps already taken, so the first update uses step 0 and warmup
    reaches the peak on step `warmup_steps`.
    """
    warmup = cfg.warmup_steps
    decay_steps = cfg.decay_steps or train_steps
    floor = cfg.min_lr / cfg.lr

    def multiplier(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "inverse_sqrt":
            # Vaswani et al.: lr ~ 1/sqrt(step) after warmup, continuous at the peak.
            return math.sqrt(max(warmup, 1) / (step + 1))
        if cfg.schedule == "wsd":
            return wsd_multiplier(cfg, train_steps, step)
        progress = min(1.0, (step - warmup) / max(1, decay_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def wsd_cooldown_start(cfg: OptimConfig, train_steps: int) -> int:
    """The step at which the cooldown of a warmup-stable-decay run begins."""
    return train_steps - max(1, round(cfg.cooldown_fraction * train_steps))


def wsd_multiplier(cfg: OptimConfig, train_steps: int, step: int) -> float:
    """Warmup-stable-decay after warmup: the peak up to the cooldown start, then down to
    min_lr at `train_steps`. Every run of one schedule is the same function up to its own
    cooldown start, whatever its length, so a shorter run is a branch of a longer one taken from
    a checkpoint at or before that step (pretrain.scaling)."""
    start = wsd_cooldown_start(cfg, train_steps)
    if step <= start:
        return 1.0
    floor = cfg.min_lr / cfg.lr
    progress = min(1.0, (step - start) / (train_steps - start))
    drop = math.sqrt(progress) if cfg.cooldown_shape == "1-sqrt" else progress
    return floor + (1.0 - floor) * (1.0 - drop)


def build_scheduler(cfg: OptimConfig, train_steps: int):
    """A factory DeepSpeed calls with the optimizer it built."""
    fn = lr_lambda(cfg, train_steps)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
