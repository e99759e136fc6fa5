"""AdamW parameter groups and learning-rate schedules.

Schedules are pure functions of the step, wrapped in a LambdaLR that DeepSpeed steps once per
optimizer step and stores in its checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pretrain.config import OptimConfig

# Position tables are matrices but not weights of a linear map: shrinking them toward zero
# only blurs positions (learned absolute embeddings, T5's relative-position bias tables).
POSITION_TABLES = ("pos_embed", "enc_bias", "dec_bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norm gains and position tables are left undecayed, as in
    GPT-2/3 and Megatron."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        table = any(part in POSITION_TABLES for part in name.split("."))
        # A parameter built under ZeRO-3's zero.Init holds an empty tensor; its shape is ds_shape.
        matrix = len(getattr(p, "ds_shape", p.shape)) >= 2
        (decay if matrix and not table else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


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
        progress = min(1.0, (step - warmup) / max(1, decay_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(cfg: OptimConfig, train_steps: int):
    """A factory DeepSpeed calls with the optimizer it built."""
    fn = lr_lambda(cfg, train_steps)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
