"""Transformer building blocks, tensor-parallel through megatron-core layers.

Activations use megatron's layout: sequence first, [s, b, d], because sequence parallelism
shards the first dimension. Shape suffixes name dimensions:
  S sequence, B batch, D model width, H heads on this rank, K head size, F MLP width on this rank,
  V vocabulary rows on this rank.
At TP=1 every layer is a plain dense layer; at TP=n column-parallel layers hold 1/n of the output
features (whole attention heads, whole MLP columns) and row-parallel layers all-reduce their
output, so the model code does not change with the layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core import tensor_parallel as tp
from torch import nn

from pretrain.config import ModelConfig


def normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


def parallel_config(tp_size: int, pp_size: int = 1) -> ModelParallelConfig:
    """megatron-core settings shared by every TP layer of a model.

    Weights are initialised on the CPU from one full master tensor and then sliced, so a model
    starts from the same numbers at any TP size (what TP=1 vs TP=n equivalence relies on).
    """
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        pipeline_dtype=torch.float32 if pp_size > 1 else None,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=torch.float32,
    )


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), applied to queries and keys: rotating pairs of
    features by position-dependent angles makes q.k depend on the relative offset only."""

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles_SK = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        # Not persistent: derived from the config, so checkpoints stay free of them.
        self.register_buffer("cos_SK", angles_SK.cos(), persistent=False)
        self.register_buffer("sin_SK", angles_SK.sin(), persistent=False)

    def forward(self, x_BHSK: torch.Tensor) -> torch.Tensor:
        s = x_BHSK.shape[2]
        cos, sin = self.cos_SK[:s].to(x_BHSK.dtype), self.sin_SK[:s].to(x_BHSK.dtype)
        # Rotate the first half of the features against the second half (the convention of
        # GPT-NeoX and Llama checkpoints, so exported weights need no permutation).
        x1, x2 = x_BHSK.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention through scaled_dot_product_attention (FlashAttention
    kernels on GPU, the fused CPU kernel on CPU).

    The fused QKV projection is laid out per head as [head, (q, k, v), K], so splitting its output
    features across TP ranks hands each rank whole heads with their own q, k and v.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        mp: ModelParallelConfig,
        tp_group: Any,
        rotary: RotaryEmbedding | None,
    ):
        super().__init__()
        tp_size = mp.tensor_model_parallel_size
        self.heads_local = cfg.n_heads // tp_size
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.rotary = rotary
        self.qkv = tp.ColumnParallelLinear(
            cfg.d_model,
            3 * cfg.d_model,
            config=mp,
            init_method=normal_init(cfg.init_std),
            bias=cfg.bias,
            gather_output=False,
            tp_group=tp_group,
        )
        self.proj = tp.RowParallelLinear(
            cfg.d_model,
            cfg.d_model,
            config=mp,
            init_method=normal_init(cfg.init_std / math.sqrt(2 * cfg.n_layers)),
            bias=cfg.bias,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=tp_group,
        )

    def forward(self, x_SBD: torch.Tensor) -> torch.Tensor:
        s, b, _ = x_SBD.shape
        qkv, _ = self.qkv(x_SBD)
        qkv_SBH3K = qkv.view(s, b, self.heads_local, 3, self.head_dim)
        q_BHSK, k_BHSK, v_BHSK = qkv_SBH3K.permute(3, 1, 2, 0, 4).unbind(0)
        if self.rotary is not None:
            q_BHSK, k_BHSK = self.rotary(q_BHSK), self.rotary(k_BHSK)
        o_BHSK = F.scaled_dot_product_attention(
            q_BHSK, k_BHSK, v_BHSK, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        o_SBF = o_BHSK.permute(2, 0, 1, 3).reshape(s, b, self.heads_local * self.head_dim)
        out, _ = self.proj(o_SBF)
        return out


class MLP(nn.Module):
    """Position-wise feed-forward: column-parallel up projection, GELU, row-parallel down."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, tp_group: Any):
        super().__init__()
        self.up = tp.ColumnParallelLinear(
            cfg.d_model,
            cfg.ffn_size,
            config=mp,
            init_method=normal_init(cfg.init_std),
            bias=cfg.bias,
            gather_output=False,
            tp_group=tp_group,
        )
        self.down = tp.RowParallelLinear(
            cfg.ffn_size,
            cfg.d_model,
            config=mp,
            init_method=normal_init(cfg.init_std / math.sqrt(2 * cfg.n_layers)),
            bias=cfg.bias,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=tp_group,
        )

    def forward(self, x_SBD: torch.Tensor) -> torch.Tensor:
        h_SBF, _ = self.up(x_SBD)
        out, _ = self.down(F.gelu(h_SBF))
        return out


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(
        self,
        cfg: ModelConfig,
        mp: ModelParallelConfig,
        tp_group: Any,
        rotary: RotaryEmbedding | None,
    ):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = SelfAttention(cfg, mp, tp_group, rotary)
        self.ln_mlp = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg, mp, tp_group)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_SBD: torch.Tensor) -> torch.Tensor:
        x_SBD = x_SBD + self.drop(self.attn(self.ln_attn(x_SBD)))
        return x_SBD + self.drop(self.mlp(self.ln_mlp(x_SBD)))
