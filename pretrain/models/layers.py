"""Transformer building blocks, tensor-parallel through megatron-core layers.

The residual stream is [b, s, d], as in a plain PyTorch loop, where attention reads q, k and v
from the projection's output and merges its heads without copies; under sequence parallelism it
is megatron's [s, b, d], because sequence parallelism shards the first dimension
(`TensorParallel.seq_first`, `stream_order`). Shape suffixes name dimensions:
  S sequence (Q queries, K keys where they differ), B batch, T the stream's two token dimensions
  in its order ([b, s], or [s, b] under sequence parallelism), D model width, H heads on this
  rank, G key/value groups on this rank, E head size, F MLP width on this rank, V vocabulary
  rows on this rank.
At TP=1 every layer is a plain dense layer; at TP=n column-parallel layers hold 1/n of the output
features (whole attention heads, whole key/value groups, whole MLP columns) and row-parallel
layers sum their partial outputs over the group, so the model code does not change with the
layout. With sequence parallelism the residual stream between the TP layers holds 1/n of the
sequence: column layers all-gather it, row layers reduce-scatter into it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import ModelParallelConfig
from megatron.core import tensor_parallel as tp
from torch import nn

from pretrain.config import ModelConfig

# AttentionMask and attention_mask live with the kernels; imported here for the model families.
from pretrain.models.attention import (  # noqa: F401
    AttentionMask,
    BlockCache,
    KVCache,
    attend,
    attention_mask,
)
from pretrain.models.collectives import (
    gather_last_dim,
    gather_sequence,
    reduce_scatter_sequence,
)
from pretrain.models.rng import ModelParallelRNG, model_parallel_seed


def normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


def parallel_config(tp_size: int, pp_size: int = 1) -> ModelParallelConfig:
    """megatron-core settings shared by every TP layer of a model.

    Weights are initialised on the CPU from one full master tensor and then sliced, so a model
    starts from the same numbers at any TP size (what TP=1 vs TP=n equivalence relies on).
    megatron's own `sequence_parallel` stays off: its fused gather/scatter allocates on CUDA
    only, so the sequence-parallel communication is ours (collectives.py), for CPU and GPU alike.
    """
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        pipeline_dtype=torch.float32 if pp_size > 1 else None,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=torch.float32,
    )


@dataclass(frozen=True)
class TensorParallel:
    """The tensor-parallel group a model is built for, passed down to every layer, with the
    model-parallel generator that dropout on this rank's shard of an activation draws from
    (pretrain.models.rng). Build one per model (or pipeline stage) and share it: the layers
    then share one generator, which `model_rng` finds and checkpoints save."""

    group: Any
    size: int
    sequence_parallel: bool
    mp: ModelParallelConfig
    rng: ModelParallelRNG = field(default_factory=ModelParallelRNG, compare=False)
    # The tokenizer's size: vocabulary rows above it are padding (model.tokenizer_vocab).
    real_vocab: int | None = None

    @classmethod
    def build(
        cls,
        group: Any,
        size: int = 1,
        sequence_parallel: bool = False,
        real_vocab: int | None = None,
    ) -> TensorParallel:
        # Sequence parallelism inside a group of one is a no-op (megatron disables it too).
        sp = sequence_parallel and size > 1
        tpc = cls(group, size, sp, parallel_config(size), real_vocab=real_vocab)
        # Until the trainer seeds it per (dp, pp, tp) rank (seed_model_rng), a usable default:
        # the default generator's seed (what seed_all set) and the TP rank, so TP ranks differ.
        # Reading initial_seed() draws nothing, so the weight init is unaffected.
        tpc.rng.seed(model_parallel_seed(torch.initial_seed(), 0, 0, tpc.rank))
        return tpc

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.size > 1 else 0

    @property
    def seq_first(self) -> bool:
        """The residual stream's layout: [s, b, d] under sequence parallelism, whose
        collectives shard the first dimension; [b, s, d] otherwise, where attention reads q, k
        and v, and writes its output, without a copy."""
        return self.sequence_parallel


def stream_order(x: torch.Tensor, tpc: TensorParallel) -> torch.Tensor:
    """A [b, s, ...] tensor in the residual stream's order (T), or a stream-ordered one back in
    [b, s, ...]: a transposed view under sequence parallelism (the swap is its own inverse),
    the tensor itself otherwise."""
    return x.transpose(0, 1) if tpc.seq_first else x


def stream_length(x_TD: torch.Tensor, tpc: TensorParallel) -> int:
    """The full sequence length of a residual-stream tensor (of this rank's shard's sequence
    times the TP size under sequence parallelism)."""
    return x_TD.shape[0] * tpc.size if tpc.seq_first else x_TD.shape[1]


def mark_sequence_parallel(*params: nn.Parameter | None) -> None:
    """Flag parameters that are replicated in the TP group but, under sequence parallelism, see
    only this rank's shard of the sequence: their gradients must be summed over the group
    (megatron's `param.sequence_parallel`; parallelize.py registers the hooks)."""
    for p in params:
        if p is not None:
            p.sequence_parallel = True


def mark_norm(norm: nn.Module, tpc: TensorParallel) -> nn.Module:
    if tpc.sequence_parallel:
        mark_sequence_parallel(*norm.parameters())
    return norm


def build_norm(cfg: ModelConfig, tpc: TensorParallel) -> nn.Module:
    if cfg.norm == "rmsnorm":
        norm: nn.Module = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    else:
        norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
    return mark_norm(norm, tpc)


class ResidualDropout(nn.Dropout):
    """Dropout on the residual stream and embeddings. Without sequence parallelism these
    activations are replicated across the TP group and every rank must drop the same elements,
    so it draws from the default generator (seeded alike across the group). Under sequence
    parallelism each rank holds its own slice of the sequence, which needs its own mask: it
    draws from the model-parallel generator, seeded per TP rank."""

    def __init__(self, p: float, tpc: TensorParallel):
        super().__init__(p)
        self.tpc = tpc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tpc.sequence_parallel and self.training and self.p > 0:
            with self.tpc.rng.fork(x.device):
                return super().forward(x)
        return super().forward(x)


# --- tensor-parallel linear layers ---------------------------------------------------------------


def column_linear(
    d_in: int, d_out: int, bias: bool, init: Callable, tpc: TensorParallel
) -> tp.ColumnParallelLinear:
    """A column-parallel layer (output features split). Under sequence parallelism its input is
    gathered by `column()` instead of megatron's CUDA-only fused path, so megatron's own
    gradient all-reduce is switched off (the gather's backward reduce-scatters instead)."""
    return tp.ColumnParallelLinear(
        d_in,
        d_out,
        config=tpc.mp,
        init_method=init,
        bias=bias,
        gather_output=False,
        disable_grad_reduce=tpc.sequence_parallel,
        tp_group=tpc.group,
    )


def row_linear(
    d_in: int, d_out: int, bias: bool, init: Callable, tpc: TensorParallel
) -> tp.RowParallelLinear:
    layer = tp.RowParallelLinear(
        d_in,
        d_out,
        config=tpc.mp,
        init_method=init,
        bias=bias,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=tpc.group,
    )
    if tpc.sequence_parallel:
        mark_sequence_parallel(layer.bias)  # added after the reduce-scatter, to a shard
    return layer


def plain_linear(layer: nn.Module, tpc: TensorParallel) -> bool:
    """Whether a tensor-parallel linear layer (or embedding) runs as `F.linear` (`F.embedding`)
    with its own weights: at TP=1, where megatron's autograd function does the same products
    (bitwise equal outputs) through a slower path (about 1.3x the time of F.linear's forward and
    backward on CPU, benchmarks/tp1_kernels.py). ZeRO-3's partitioned weights keep the module
    call, whose hooks gather them."""
    return tpc.size == 1 and not hasattr(layer.weight, "ds_id")


def column(layer: tp.ColumnParallelLinear, x_TD: torch.Tensor, tpc: TensorParallel):
    if plain_linear(layer, tpc):
        return F.linear(x_TD, layer.weight, layer.bias)
    if tpc.sequence_parallel:
        x_TD = gather_sequence(x_TD, tpc.group)
    out, _ = layer(x_TD)
    return out


def row(layer: tp.RowParallelLinear, x_TF: torch.Tensor, tpc: TensorParallel):
    if plain_linear(layer, tpc):
        return F.linear(x_TF, layer.weight, layer.bias)
    if not tpc.sequence_parallel:
        out, _ = layer(x_TF)
        return out
    out = reduce_scatter_sequence(F.linear(x_TF, layer.weight), tpc.group)
    return out + layer.bias if layer.bias is not None else out


# --- embeddings and positions --------------------------------------------------------------------


def token_embedding(
    cfg: ModelConfig, tpc: TensorParallel, std: float | None = None
) -> tp.VocabParallelEmbedding:
    """The vocabulary-parallel token embedding, initialised N(0, std) (default model.init_std)."""
    if cfg.vocab_size is None:
        raise ValueError("the model needs a resolved model.vocab_size (see config.resolve_vocab)")
    return tp.VocabParallelEmbedding(
        cfg.vocab_size,
        cfg.d_model,
        init_method=normal_init(cfg.init_std if std is None else std),
        config=tpc.mp,
        tp_group=tpc.group,
    )


def embed_tokens(
    embed: tp.VocabParallelEmbedding, tokens_BS: torch.Tensor, tpc: TensorParallel
) -> torch.Tensor:
    """Token ids [b, s] -> the residual stream: [b, s, d], or [s / tp, b, d], this rank's
    sequence shard, under sequence parallelism.

    Each rank looks up the ids of its vocabulary slice and zeroes the rest; the sum over the
    group completes the lookup. megatron's `reduce_scatter_embeddings` does the same sum as a
    reduce-scatter, but through its CUDA-only mapping, hence the lookup written out here.
    """
    if plain_linear(embed, tpc):  # TP=1: megatron's lookup plus an identity autograd function
        return F.embedding(tokens_BS, embed.weight)
    if not tpc.sequence_parallel:
        return embed(tokens_BS)
    tokens_SB = tokens_BS.t()  # looked up transposed, the ids write [s, b, d] without a copy
    outside = (tokens_SB < embed.vocab_start_index) | (tokens_SB >= embed.vocab_end_index)
    local = (tokens_SB - embed.vocab_start_index).masked_fill(outside, 0)
    x_SBD = F.embedding(local, embed.weight).masked_fill(outside.unsqueeze(-1), 0.0)
    return reduce_scatter_sequence(x_SBD, tpc.group)


def shard_positions(s: int, tpc: TensorParallel) -> slice:
    """The positions of the rank's sequence shard (all of them without sequence parallelism)."""
    if not tpc.sequence_parallel:
        return slice(0, s)
    n = s // tpc.size
    return slice(tpc.rank * n, (tpc.rank + 1) * n)


def sequence_parallel_pad(s: int, tpc: TensorParallel) -> int:
    """Positions to append to a sequence of `s` so that sequence parallelism can split it over
    the TP ranks (0 without sequence parallelism)."""
    return -s % tpc.size if tpc.sequence_parallel else 0


def pad_to_multiple(x_BS: torch.Tensor, pad: int, value: float = 0) -> torch.Tensor:
    """Append `pad` positions (sequence parallelism needs lengths that divide by the TP size)."""
    if x_BS.dtype == torch.bool:
        return F.pad(x_BS.to(torch.uint8), (0, pad), value=int(value)).bool()
    return F.pad(x_BS, (0, pad), value=value)


def sinusoidal_table(max_len: int, d: int) -> torch.Tensor:
    """Vaswani et al.'s fixed positions: sin on even features, cos on odd, wavelengths from
    2*pi to 10000*2*pi."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    inv = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)
    table = torch.zeros(max_len, d)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)[:, : d // 2]
    return table


def learned_positions(cfg: ModelConfig, tpc: TensorParallel) -> nn.Embedding | None:
    """The learned position table of GPT-2 / BERT (None for other position schemes)."""
    if cfg.positions != "learned":
        return None
    # The values go in through the constructor: under ZeRO-3 (zero.Init) a parameter is
    # partitioned as soon as its module's __init__ returns, and an init applied afterwards would
    # write into an empty tensor. The first draw is nn.Embedding's own N(0, 1) init, kept so
    # every later weight draws the same numbers as before.
    weight = normal_init(cfg.init_std)(nn.init.normal_(torch.empty(cfg.seq_len, cfg.d_model)))
    table = nn.Embedding(cfg.seq_len, cfg.d_model, _weight=weight)
    if tpc.sequence_parallel:  # added after the scatter: each rank trains its own rows only
        mark_sequence_parallel(table.weight)
    return table


@contextmanager
def unit_init(seed: int, unit: int):
    """Initialise unit number `unit` of a model (the token embedding, a block, a head...) from
    its own seed. A unit's weights then depend only on (seed, unit), not on which other units
    this process builds: a pipeline stage that builds only its own layers starts from exactly
    the weights of the whole model built in one process. Only the CPU generator is forked:
    every layer initialises on the CPU (parallel_config's use_cpu_initialization)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100_003 + unit)
        yield


def draw_model_seed() -> int:
    """A model's init seed taken from torch's global generator, for callers that seed that
    generator and pass no seed (the same global seed gives the same model)."""
    return int(torch.randint(0, 2**31 - 1, ()).item())


class ParallelModel(nn.Module):
    """Base of the model families: the config and this rank's tensor-parallel context, taken
    the same way by every family so `build_model` can construct any of them. `seed` seeds each
    unit's init (`unit_init`); None draws it from torch's global generator."""

    def __init__(
        self,
        cfg: ModelConfig,
        tp_group: Any,
        tp_size: int = 1,
        sequence_parallel: bool = False,
        seed: int | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.tp_group = tp_group
        self.tpc = TensorParallel.build(tp_group, tp_size, sequence_parallel, cfg.tokenizer_vocab)
        self.init_seed = draw_model_seed() if seed is None else seed

    def unit(self, index: int):
        return unit_init(self.init_seed, index)

    def stack(self, first_unit: int, count: int, make: Callable[[], nn.Module]) -> nn.ModuleList:
        """`count` blocks from `make()`, block i initialised as unit `first_unit + i`."""
        blocks = []
        for i in range(count):
            with self.unit(first_unit + i):
                blocks.append(make())
        return nn.ModuleList(blocks)


def absolute_positions(m: nn.Module, x_TD: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Add a GPT's or BERT's absolute positions (`attach_positions` gave `m` its table) to the
    embedded tokens of this rank's shard; rotary and relative schemes add nothing here.
    `offset`: the first token's position (generation with a KV cache, whole sequences only)."""
    tpc: TensorParallel = m.tpc
    s = stream_length(x_TD, tpc)
    if m.pos_embed is not None:
        return add_positions(x_TD, m.pos_embed.weight, s, tpc, offset)
    if m.cfg.positions == "sinusoidal":
        return add_positions(x_TD, m.pos_table, s, tpc, offset)
    return x_TD


def lm_head(cfg: ModelConfig, tpc: TensorParallel, std: float | None = None):
    """An untied output projection: column-parallel over the vocabulary, no bias."""
    init = normal_init(cfg.init_std if std is None else std)
    return column_linear(cfg.d_model, cfg.vocab_size, False, init, tpc)


def full_logits(logits_TV: torch.Tensor, tpc: TensorParallel, s: int | None = None):
    """Every rank's vocabulary slice gathered into [b, s, v], less any sequence-parallel
    padding beyond the first `s` positions."""
    return stream_order(gather_last_dim(logits_TV, tpc.group), tpc)[:, :s]


def lm_logits(
    h_TD: torch.Tensor,
    tpc: TensorParallel,
    head: tp.ColumnParallelLinear | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's slice of the vocabulary logits [T, v / tp] for the whole sequence, from an
    untied column-parallel `head` or the tied embedding `weight`."""
    if tpc.sequence_parallel:
        # Every rank scores the whole sequence against its vocabulary slice; the gather's
        # backward sums the ranks' gradients and hands each its shard.
        h_TD = gather_sequence(h_TD, tpc.group)
    elif head is None and tpc.size > 1:
        # The tied projection reads the full hidden state on every TP rank; the copy makes the
        # backward pass all-reduce its gradient across the group (megatron's
        # parallel_lm_logits). The untied head does the same inside ColumnParallelLinear.
        h_TD = tp.copy_to_tensor_model_parallel_region(h_TD, group=tpc.group)
    if head is not None:
        logits = column(head, h_TD, tpc) if not tpc.sequence_parallel else head(h_TD)[0]
    else:
        logits = F.linear(h_TD, weight)
    return mask_padding(logits, tpc)


def mask_padding(logits_TV: torch.Tensor, tpc: TensorParallel) -> torch.Tensor:
    """The padding rows' logits (vocabulary ids >= tpc.real_vocab) at the dtype's minimum:
    no probability, no gradient, never sampled. The model's function then does not depend on
    how far the vocabulary is padded, so a checkpoint loads under another TP's padding."""
    if tpc.real_vocab is None:
        return logits_TV
    local = logits_TV.shape[-1]
    first_pad = tpc.real_vocab - tpc.rank * local  # in this rank's slice
    if first_pad >= local:
        return logits_TV
    # In place: the projection's backward does not need its output, and the fill's backward
    # gives the padding zero gradient.
    logits_TV[..., max(first_pad, 0) :] = torch.finfo(logits_TV.dtype).min
    return logits_TV


def attach_positions(model: nn.Module, cfg: ModelConfig, tpc: TensorParallel):
    """Give a GPT or BERT its absolute positions: the learned table `pos_embed` (None for other
    schemes) and, for sinusoidal positions, the fixed buffer `pos_table` (not persistent: it is
    derived from the config, so checkpoints stay free of it). Returns the rotary embedding the
    attention layers apply for `positions: rope`, else None."""
    model.pos_embed = learned_positions(cfg, tpc)
    if cfg.positions == "sinusoidal":
        table = sinusoidal_table(cfg.seq_len, cfg.d_model)
        model.register_buffer("pos_table", table, persistent=False)
    if cfg.positions == "rope":
        return RotaryEmbedding(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
    return None


def add_positions(
    x_TD: torch.Tensor, table_SD: torch.Tensor, s: int, tpc: TensorParallel, offset: int = 0
) -> torch.Tensor:
    """Add the position vectors of this rank's shard of a sequence of `s` tokens (starting at
    position `offset`, which only generation's unsharded steps use)."""
    rows = shard_positions(s, tpc) if offset == 0 else slice(offset, offset + s)
    return x_TD + table_SD[rows].to(x_TD.dtype).unsqueeze(1 if tpc.seq_first else 0)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), applied to queries and keys: rotating pairs of
    features by position-dependent angles makes q.k depend on the relative offset only."""

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles_SE = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        # Not persistent: derived from the config, so checkpoints stay free of them.
        self.register_buffer("cos_SK", angles_SE.cos(), persistent=False)
        self.register_buffer("sin_SK", angles_SE.sin(), persistent=False)

    def forward(self, x_BHSE: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """`offset`: the position of the first of the s vectors (generation with a KV cache)."""
        s = x_BHSE.shape[2] + offset
        cos, sin = self.cos_SK[offset:s].to(x_BHSE.dtype), self.sin_SK[offset:s].to(x_BHSE.dtype)
        # Rotate the first half of the features against the second half (the convention of
        # GPT-NeoX and Llama checkpoints, so exported weights need no permutation).
        x1, x2 = x_BHSE.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def relative_position_bucket(
    rel_QK: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each offset `key - query`: exact buckets for small offsets, then
    logarithmically wider ones up to max_distance, beyond which all share the last bucket.
    Bidirectional (encoder) buckets spend half the buckets on each direction; unidirectional
    (decoder) ones see only keys at or before the query."""
    buckets = torch.zeros_like(rel_QK)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel_QK > 0).long() * num_buckets
        n = rel_QK.abs()
    else:
        n = (-rel_QK).clamp(min=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(n.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(n < max_exact, n, large)


class RelativePositionBias(nn.Module):
    """T5's learned scalar bias per (bucket, head), added to the attention scores. One instance
    per stack, shared by all its layers. Heads are split over TP ranks like the attention
    heads, so the table is initialised whole and sliced (the same numbers at any TP size)."""

    def __init__(self, cfg: ModelConfig, tpc: TensorParallel, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.rel_buckets, cfg.rel_max_distance
        heads = cfg.n_heads // tpc.size
        master = torch.empty(cfg.rel_buckets, cfg.n_heads)
        normal_init(cfg.init_std)(master)
        self.weight = nn.Parameter(master[:, tpc.rank * heads : (tpc.rank + 1) * heads].clone())
        tp.set_tensor_model_parallel_attributes(self.weight, True, 1, 1)

    def forward(self, q_len: int, k_len: int, q_offset: int = 0) -> torch.Tensor:
        """Additive bias [1, h, q, k] for this rank's heads, for queries at positions
        q_offset.. (generation's later steps) and keys at 0..k_len-1."""
        keys = torch.arange(k_len, device=self.weight.device)
        queries = torch.arange(q_offset, q_offset + q_len, device=self.weight.device)
        rel_QK = keys[None, :] - queries[:, None]
        bucket_QK = relative_position_bucket(
            rel_QK, self.bidirectional, self.num_buckets, self.max_distance
        )
        return self.weight[bucket_QK].permute(2, 0, 1).unsqueeze(0)


# --- attention -----------------------------------------------------------------------------------


def _qkv_init(std: float, q_std: float, groups: int, q_per_group: int, head_dim: int):
    """Init of the fused QKV master weight; query rows may use their own std (T5 folds the
    1/sqrt(head size) of scaled dot-product attention into the query init)."""

    def init(w: torch.Tensor) -> torch.Tensor:
        nn.init.normal_(w, mean=0.0, std=std)
        if q_std != std:
            with torch.no_grad():
                rows = w.view(groups, q_per_group + 2, head_dim, -1)
                rows[:, :q_per_group].mul_(q_std / std)
        return w

    return init


class Attention(nn.Module):
    """Multi-head, grouped-query or multi-query attention through scaled_dot_product_attention
    (FlashAttention / cuDNN kernels on GPU, the fused CPU kernel on CPU); self-attention, or
    cross-attention to a `memory` (the T5 encoder output).

    The fused QKV projection's output features are laid out per key/value group as
    [group, (q_1 .. q_{n_heads/n_kv}, k, v), head size], so a column split over TP ranks hands
    each rank whole groups: its query heads together with the keys and values they read. With
    n_kv_heads = n_heads this is [head, (q, k, v), head size].
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tpc: TensorParallel,
        *,
        n_layers: int,
        cross: bool = False,
        rotary: RotaryEmbedding | None = None,
        scale: float | None = None,
        q_init_std: float | None = None,
    ):
        super().__init__()
        self.tpc = tpc
        e = self.head_dim = cfg.head_dim
        self.heads_local = cfg.n_heads // tpc.size
        self.groups_local = cfg.kv_heads // tpc.size
        self.q_per_group = cfg.n_heads // cfg.kv_heads
        self.dropout = cfg.dropout
        self.rotary = rotary
        self.scale = scale
        # Sliding-window / Longformer reach of this layer (attention.layer_window sets it per
        # block index; None: every key the stack's mask allows).
        self.window: int | None = None
        std = cfg.init_std
        q_std = std if q_init_std is None else q_init_std
        d, h, g = cfg.d_model, cfg.n_heads, cfg.kv_heads
        if cross:
            self.q = column_linear(d, h * e, cfg.bias, normal_init(q_std), tpc)
            self.kv = column_linear(d, 2 * g * e, cfg.bias, normal_init(std), tpc)
        else:
            init = _qkv_init(std, q_std, g, self.q_per_group, e)
            self.qkv = column_linear(d, (h + 2 * g) * e, cfg.bias, init, tpc)
        self.proj = row_linear(h * e, d, cfg.bias, normal_init(std / math.sqrt(2 * n_layers)), tpc)

    def _heads(self, x_TF: torch.Tensor, n: int) -> torch.Tensor:
        """[T, n * e] -> [b, n, s, e] (a view)"""
        x_BSF = stream_order(x_TF, self.tpc)
        return x_BSF.view(*x_BSF.shape[:2], n, self.head_dim).transpose(1, 2)

    def attend(
        self, q_BHSE: torch.Tensor, k_BGSE: torch.Tensor, v_BGSE: torch.Tensor, mask: AttentionMask
    ) -> torch.Tensor:
        """The attention core, softmax(q k^T + bias) v with dropout on the probabilities: what
        selective recompute recomputes. The probabilities belong to this rank's heads only, so
        their dropout draws from the model-parallel generator (a different mask on each TP
        rank); SDPA draws from the default generator, whose state fork() swaps."""
        dropout = self.dropout if self.training else 0.0
        rng = self.tpc.rng.fork(q_BHSE.device) if dropout > 0 else contextlib.nullcontext()
        with rng:
            return attend(
                q_BHSE,
                k_BGSE,
                v_BGSE,
                mask,
                window=self.window,
                dropout=dropout,
                scale=self.scale,
            )

    def forward(
        self,
        x_TD: torch.Tensor,
        mask: AttentionMask,
        memory_TD: torch.Tensor | None = None,
        *,
        recompute: bool = False,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """`recompute`: recompute the attention core in the backward pass (selective).
        `cache`: generation's keys and values of the earlier tokens (attention.KVCache)."""
        e, g, per = self.head_dim, self.groups_local, self.q_per_group
        if memory_TD is None:
            # q, k and v are views of the projection's output, read by the kernels with a
            # sequence stride of one token in the [b, s, d] stream (b tokens in the [s, b, d]
            # one, whose backward also copies the gradient back into [s, b] order). A split,
            # not three selects: its backward is one concatenation of the three gradients,
            # where each select's would zero-fill a whole qkv-sized tensor and add into it.
            qkv_BSF = stream_order(column(self.qkv, x_TD, self.tpc), self.tpc)
            b, s = qkv_BSF.shape[:2]
            qkv_BSGPE = qkv_BSF.view(b, s, g, per + 2, e)  # splits the last dimension only
            q, k, v = qkv_BSGPE.split_with_sizes([per, 1, 1], dim=3)
            q_BHSE = q.reshape(b, s, g * per, e).transpose(1, 2)
            k_BGSE, v_BGSE = k.squeeze(3).transpose(1, 2), v.squeeze(3).transpose(1, 2)
        else:
            q_BHSE = self._heads(column(self.q, x_TD, self.tpc), self.heads_local)
            if cache is not None and cache.k_BGKE is not None:  # the encoder's, projected once
                k_BGSE, v_BGSE = cache.k_BGKE, cache.v_BGKE
            else:
                kv_BKF = stream_order(column(self.kv, memory_TD, self.tpc), self.tpc)
                kv_BKG2E = kv_BKF.view(*kv_BKF.shape[:2], g, 2, e)
                k_BGSE = kv_BKG2E[:, :, :, 0].transpose(1, 2)
                v_BGSE = kv_BKG2E[:, :, :, 1].transpose(1, 2)
        if self.rotary is not None:
            offset = cache.offset if cache is not None else 0
            q_BHSE, k_BGSE = self.rotary(q_BHSE, offset), self.rotary(k_BGSE, offset)
        if cache is not None:
            o_BHSE = cache.attend(
                q_BHSE,
                k_BGSE,
                v_BGSE,
                mask,
                cross=memory_TD is not None,
                window=self.window,
                scale=self.scale,
            )
        elif recompute and torch.is_grad_enabled():
            # Selective recompute: keep q, k, v and o, recompute the probabilities [b, h, q, k]
            # (the largest activation) in the backward pass, with the same dropout mask.
            o_BHSE = torch.utils.checkpoint.checkpoint(
                self.attend,
                q_BHSE,
                k_BGSE,
                v_BGSE,
                mask,
                use_reentrant=False,
                context_fn=self.tpc.rng.checkpoint_context,
            )
        else:
            o_BHSE = self.attend(q_BHSE, k_BGSE, v_BGSE, mask)
        # The CPU kernel lays o out in memory as it found q: its heads merge into the
        # stream's [T, h * e] as a view.
        o_THE = stream_order(o_BHSE.transpose(1, 2), self.tpc)
        o_TF = o_THE.reshape(*o_THE.shape[:2], self.heads_local * e)
        return row(self.proj, o_TF, self.tpc)


# --- MLP and blocks ------------------------------------------------------------------------------


class MLP(nn.Module):
    """Position-wise feed-forward: column-parallel up projection, activation, row-parallel down.

    Gated variants (SwiGLU, GeGLU) compute act(x W_gate) * (x W_up) with W_gate and W_up fused
    into one column-parallel matmul whose output features interleave them, [g_0, u_0, g_1, u_1,
    ...]: any column split then keeps each gate next to its up projection, at any TP size.
    """

    ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "gelu": F.gelu,
        "relu": F.relu,
        "swiglu": F.silu,
        "geglu": F.gelu,
    }

    def __init__(self, cfg: ModelConfig, tpc: TensorParallel, *, n_layers: int):
        super().__init__()
        self.tpc = tpc
        self.gated = cfg.activation in ("swiglu", "geglu")
        self.act = self.ACTIVATIONS[cfg.activation]
        f = cfg.ffn_size
        self.up = column_linear(
            cfg.d_model, 2 * f if self.gated else f, cfg.bias, normal_init(cfg.init_std), tpc
        )
        down_init = normal_init(cfg.init_std / math.sqrt(2 * n_layers))
        self.down = row_linear(f, cfg.d_model, cfg.bias, down_init, tpc)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h_TF = column(self.up, x_TD, self.tpc)
        if self.gated:
            pairs = h_TF.view(*h_TF.shape[:-1], -1, 2)
            h_TF = self.act(pairs[..., 0]) * pairs[..., 1]
        else:
            h_TF = self.act(h_TF)
        return row(self.down, h_TF, self.tpc)


class Block(nn.Module):
    """A transformer block: self-attention, optional cross-attention (T5 decoder), MLP.

    Pre-LN: x + f(norm(x)) for each sub-layer; post-LN: norm(x + f(x)). The block carries the
    model's recompute policy (model.recompute, model.recompute_interval), which `run_block`
    applies.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tpc: TensorParallel,
        *,
        n_layers: int,
        cross: bool = False,
        rotary: RotaryEmbedding | None = None,
        scale: float | None = None,
        q_init_std: float | None = None,
    ):
        super().__init__()
        attn_kw: dict[str, Any] = dict(n_layers=n_layers, scale=scale, q_init_std=q_init_std)
        self.pre_norm = cfg.norm_position == "pre"
        self.ln_attn = build_norm(cfg, tpc)
        self.attn = Attention(cfg, tpc, rotary=rotary, **attn_kw)
        self.ln_cross: nn.Module | None = None
        self.cross_attn: Attention | None = None
        if cross:
            self.ln_cross = build_norm(cfg, tpc)
            self.cross_attn = Attention(cfg, tpc, cross=True, **attn_kw)
        self.ln_mlp = build_norm(cfg, tpc)
        self.mlp = MLP(cfg, tpc, n_layers=n_layers)
        self.drop = ResidualDropout(cfg.dropout, tpc)
        self.tpc = tpc
        self.recompute, self.recompute_interval = cfg.recompute, cfg.recompute_interval

    def _sub(self, x_TD: torch.Tensor, norm: nn.Module, f: Callable) -> torch.Tensor:
        # Without dropout the module call is skipped: it returns its input, after Python
        # overhead that shows on small models.
        drop = self.drop if self.drop.p > 0 else (lambda y: y)
        if self.pre_norm:
            return x_TD + drop(f(norm(x_TD)))
        return norm(x_TD + drop(f(x_TD)))

    def forward(
        self,
        x_TD: torch.Tensor,
        mask: AttentionMask,
        memory_TD: torch.Tensor | None = None,
        memory_mask: AttentionMask | None = None,
        *,
        recompute_attention: bool = False,
        cache: BlockCache | None = None,
    ) -> torch.Tensor:
        """`recompute_attention`: recompute the attention cores in the backward pass
        (selective recompute; run_block sets it). `cache`: generation's KV caches."""
        rc = recompute_attention
        kv, cross_kv = (cache.self_attn, cache.cross_attn) if cache is not None else (None, None)
        x_TD = self._sub(x_TD, self.ln_attn, lambda h: self.attn(h, mask, recompute=rc, cache=kv))
        if self.cross_attn is not None:
            if memory_TD is None or memory_mask is None:
                raise ValueError("a cross-attention block needs the encoder output and its mask")
            cross = self.cross_attn
            x_TD = self._sub(
                x_TD,
                self.ln_cross,
                lambda h: cross(h, memory_mask, memory_TD, recompute=rc, cache=cross_kv),
            )
        return self._sub(x_TD, self.ln_mlp, self.mlp)


def recomputes(block: Block, index: int) -> bool:
    """Whether block number `index` (0-based, counted within its stack) is recomputed: with
    model.recompute full or selective, the blocks whose index % recompute_interval == 0, i.e.
    blocks 0, N, 2N, ... (every block at N=1; about 1/N of them otherwise)."""
    return block.recompute != "none" and index % block.recompute_interval == 0


def run_block(block: Block, index: int, x_TD: torch.Tensor, *args: Any) -> torch.Tensor:
    """Apply block number `index` of its stack under the model's recompute policy.

    full: the whole block runs without keeping its activations and is recomputed in the
    backward pass (only its input is stored). selective: only the attention core (q, k, v -> o)
    is recomputed. Either way the recomputation redraws the forward's dropout masks: torch's
    checkpoint restores the default generator, and `checkpoint_context` the model-parallel one.
    Recompute needs autograd; under no_grad (evaluation) the block just runs.
    """
    if not recomputes(block, index) or not torch.is_grad_enabled():
        return block(x_TD, *args)
    if block.recompute == "selective":
        return block(x_TD, *args, recompute_attention=True)
    return torch.utils.checkpoint.checkpoint(
        block, x_TD, *args, use_reentrant=False, context_fn=block.tpc.rng.checkpoint_context
    )


def run_blocks(blocks: nn.ModuleList, x_TD: torch.Tensor, *args: Any) -> torch.Tensor:
    """Apply a stack of blocks in order, each under the recompute policy (run_block)."""
    for index, block in enumerate(blocks):
        x_TD = run_block(block, index, x_TD, *args)
    return x_TD


# --- output and loss -----------------------------------------------------------------------------


def lm_loss(
    logits_TV: torch.Tensor,
    targets_BS: torch.Tensor,
    loss_mask_BS: torch.Tensor | None,
    tpc: TensorParallel,
    loss_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Vocab-parallel cross-entropy over the scored positions (all, or where loss_mask is 1).

    Without `loss_tokens` it is the mean over this batch's scored positions (a batch with none
    gives 0, not NaN). With it, the sum over them divided by `loss_tokens`: the trainer passes
    the step's scored positions over all micro-batches and data-parallel ranks, divided by their
    number, so that after DeepSpeed's mean over micro-batches and ranks every token of the step
    weighs the same, however the batch was split (pretrain.steps.token_weights)."""
    targets_T = stream_order(targets_BS, tpc)  # in the logits' order
    if tpc.size == 1:
        # The whole vocabulary is here: torch's fused kernel, not megatron's three all-reduces
        # over a group of one and its unfused softmax (about 1.2x faster on CPU,
        # benchmarks/tp1_kernels.py; equal to it within float32 rounding, tests/unit/test_perf.py).
        logits_NV = logits_TV.float().flatten(0, 1)
        if loss_mask_BS is None:  # every position scores: the kernel's own sum, no [T] losses
            total = F.cross_entropy(logits_NV, targets_T.reshape(-1), reduction="sum")
            count = total.new_tensor(float(targets_T.numel()))
            return total / (count if loss_tokens is None else loss_tokens.to(total.dtype))
        loss_T = F.cross_entropy(logits_NV, targets_T.reshape(-1), reduction="none")
        loss_T = loss_T.view(targets_T.shape)
    else:
        targets_T = targets_T.contiguous()
        # megatron's vocab_parallel_cross_entropy reduces over parallel_state's global TP
        # group, not the model's: a model built for another group would get a wrong loss.
        from megatron.core import parallel_state as ps

        if (
            ps.model_parallel_is_initialized()
            and ps.get_tensor_model_parallel_world_size() != tpc.size
        ):
            raise ValueError(
                f"the model is built for TP={tpc.size} but megatron's tensor-parallel group has "
                f"{ps.get_tensor_model_parallel_world_size()} ranks; the loss would be reduced "
                f"over it"
            )
        loss_T = tp.vocab_parallel_cross_entropy(logits_TV.float(), targets_T)
    if loss_mask_BS is None:
        total, count = loss_T.sum(), loss_T.new_tensor(float(loss_T.numel()))
    else:
        mask_T = stream_order(loss_mask_BS, tpc).to(loss_T.dtype)
        total, count = (loss_T * mask_T).sum(), mask_T.sum().clamp(min=1.0)
    return total / (count if loss_tokens is None else loss_tokens.to(total.dtype))


def scored_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions of a batch that enter the loss (what `lm_loss` sums over)."""
    mask = batch.get("loss_mask")
    return int(mask.sum().item()) if mask is not None else batch["targets"].numel()
