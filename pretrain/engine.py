"""The DeepSpeed engine: its JSON config derived from ours, and `deepspeed.initialize`.

AdamW is DeepSpeed's wrapper around the torch implementation (`torch_adam`), so nothing is
compiled on any machine; ZeRO stages 0-3, gradient accumulation, clipping and bf16 all come from
the run config. The learning-rate schedule is ours (pretrain.optim), stepped and checkpointed by
DeepSpeed.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pretrain.config import Config
from pretrain.distributed import DeepSpeedMPU, Layout
from pretrain.optim import build_scheduler, param_groups


def deepspeed_config(cfg: Config, layout: Layout) -> dict[str, Any]:
    o = cfg.optim
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.parallel.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": cfg.parallel.micro_batch_size * layout.dp_size * layout.grad_accum,
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": cfg.run.precision == "bf16"},
        # Our trainer prints its own progress; DeepSpeed's periodic prints would interleave.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.zero_stage == 3:
        # Gather a layer's full weights only while it runs; small models need no prefetching.
        ds["zero_optimization"].update(stage3_param_persistence_threshold=0)
    return ds


def build_engine(cfg: Config, layout: Layout, model: nn.Module):
    """(engine, lr_scheduler) for a model whose weights are identical on every DP rank."""
    import deepspeed

    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=deepspeed_config(cfg, layout),
        lr_scheduler=build_scheduler(cfg.optim, cfg.run.train_steps),
        mpu=DeepSpeedMPU(layout),
        dist_init_required=False,
    )
    return engine, scheduler


def records_grad_norm(engine: Any) -> bool:
    """Whether DeepSpeed records the gradient norm itself (ZeRO 1-3 and bf16 do; plain fp32
    stage 0 clips without keeping the norm)."""
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled()


def grad_norm_now(engine: Any) -> float:
    """The global gradient norm of the gradients as they are (call after the boundary's
    backward, before step), computed by DeepSpeed's own clipping routine with an infinite limit
    so nothing is clipped twice: model-parallel aware, over the data-parallel-reduced grads."""
    from deepspeed.runtime.utils import clip_grad_norm_

    return float(clip_grad_norm_(engine.module.parameters(), float("inf"), mpu=engine.mpu))
