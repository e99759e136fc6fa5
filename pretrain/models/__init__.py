"""The model zoo: GPT, BERT and T5 on megatron-core tensor-parallel layers.

`build_model` is the one constructor the trainer and tools call. The families are imported
lazily so `pretrain.models.flops` (parameter counts, no torch) stays cheap to import.
"""

from __future__ import annotations

import importlib
from typing import Any

FAMILIES: dict[str, tuple[str, str]] = {
    "gpt": ("pretrain.models.gpt", "GPT"),
    "bert": ("pretrain.models.bert", "BERT"),
    "t5": ("pretrain.models.t5", "T5"),
}


def build_model(
    model_cfg: Any,
    tp_group: Any,
    tp_size: int = 1,
    sequence_parallel: bool = False,
    ep_size: int = 1,
    ep_rank: int = 0,
):
    """The model of `model_cfg.family` for this rank's tensor-parallel group, with the
    sequence-parallel gradient hooks registered (pretrain.models.parallelize) and, for a
    mixture of experts, this expert-parallel rank's experts (pretrain.models.moe)."""
    from pretrain.models.parallelize import parallelize

    module, name = FAMILIES[model_cfg.family]
    cls = getattr(importlib.import_module(module), name)
    model = cls(model_cfg, tp_group, tp_size, sequence_parallel)
    parallelize(model, tp_group, tp_size, sequence_parallel)
    if model_cfg.moe_experts:  # imports DeepSpeed's MoE only for a mixture of experts
        from pretrain.models.moe import attach_experts

        attach_experts(model, ep_size, ep_rank)
    return model
