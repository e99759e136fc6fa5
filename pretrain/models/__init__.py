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


def build_model(model_cfg: Any, tp_group: Any, tp_size: int = 1, sequence_parallel: bool = False):
    """The model of `model_cfg.family` for this rank's tensor-parallel group, with the
    sequence-parallel gradient hooks registered (pretrain.models.parallelize)."""
    from pretrain.models.parallelize import parallelize

    module, name = FAMILIES[model_cfg.family]
    cls = getattr(importlib.import_module(module), name)
    model = cls(model_cfg, tp_group, tp_size, sequence_parallel)
    parallelize(model, tp_group, tp_size, sequence_parallel)
    return model
