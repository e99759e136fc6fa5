"""Encoder-only BERT with the masked-LM head (no next-sentence prediction, no token types).

Token + absolute position embeddings and an embedding norm, bidirectional blocks (post-LN as in
the paper by default through the config), then the MLM head: a dense layer, GELU, a norm, and a
decoder tied to the token embedding plus an output bias. The forward takes the loader's `mlm`
batch (tokens, targets, loss_mask, padding_mask) and returns the mean cross-entropy over the
positions chosen for prediction; without targets it returns full logits [b, s, v].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel as tp
from torch import nn

from pretrain.config import ModelConfig
from pretrain.models.attention import set_windows, stack_globals
from pretrain.models.layers import (
    Block,
    ParallelModel,
    ResidualDropout,
    TensorParallel,
    absolute_positions,
    attach_positions,
    attention_mask,
    build_norm,
    embed_tokens,
    full_logits,
    lm_head,
    lm_logits,
    lm_loss,
    mark_sequence_parallel,
    normal_init,
    pad_to_multiple,
    run_blocks,
    sequence_parallel_pad,
    token_embedding,
)


class _Dense(nn.Linear):
    """A d x d nn.Linear whose init (after nn.Linear's own draws, kept so later weights draw the
    same numbers) happens inside its constructor: under ZeRO-3 (zero.Init) parameters are
    partitioned as the constructor returns, and an init applied afterwards would be lost."""

    def __init__(self, d: int, bias: bool, init):
        self._init = init
        super().__init__(d, d, bias=bias)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._init(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def mlm_transform(cfg: ModelConfig, tpc: TensorParallel) -> nn.Linear:
    """The MLM head's dense transform, replicated on every TP rank (as in megatron's
    BertLMHead): a d x d matrix is small next to the vocabulary projection."""
    dense = _Dense(cfg.d_model, cfg.bias, normal_init(cfg.init_std))
    if tpc.sequence_parallel:
        mark_sequence_parallel(dense.weight, dense.bias)
    return dense


def output_bias(cfg: ModelConfig, tpc: TensorParallel) -> nn.Parameter:
    """The MLM output bias, split over the vocabulary like the logits it is added to."""
    bias = nn.Parameter(torch.zeros(cfg.vocab_size // tpc.size))
    tp.set_tensor_model_parallel_attributes(bias, True, 0, 1)
    return bias


class BERT(ParallelModel):
    def __init__(
        self,
        cfg: ModelConfig,
        tp_group: Any,
        tp_size: int = 1,
        sequence_parallel: bool = False,
        seed: int | None = None,
    ):
        super().__init__(cfg, tp_group, tp_size, sequence_parallel, seed)
        tpc = self.tpc
        # Units with their own init seeds, numbered as the pipeline's layers: 0 token embedding,
        # 1 positions, 2.. blocks, then the MLM head's transform and the untied head.
        with self.unit(0):
            self.embed = token_embedding(cfg, tpc)
        with self.unit(1):
            rotary = attach_positions(self, cfg, tpc)
        self.ln_embed = build_norm(cfg, tpc)
        self.drop = ResidualDropout(cfg.dropout, tpc)
        self.blocks = self.stack(
            2, cfg.n_layers, lambda: Block(cfg, tpc, n_layers=cfg.n_layers, rotary=rotary)
        )
        set_windows(self.blocks, cfg)
        self.ln_f = build_norm(cfg, tpc) if cfg.norm_position == "pre" else None
        with self.unit(2 + cfg.n_layers):
            self.head_dense = mlm_transform(cfg, tpc)
        self.head_norm = build_norm(cfg, tpc)
        self.head = None
        if not cfg.tie_embeddings:
            with self.unit(3 + cfg.n_layers):
                self.head = lm_head(cfg, tpc)
        self.out_bias = output_bias(cfg, tpc)

    def hidden(self, tokens_BS: torch.Tensor, padding_mask_BS: torch.Tensor | None = None):
        """Encoder output [b, s, d] ([s / tp, b, d], this rank's shard, under sequence
        parallelism)."""
        s = tokens_BS.shape[1]
        if s > self.cfg.seq_len:
            raise ValueError(f"sequence of {s} tokens exceeds model.seq_len={self.cfg.seq_len}")
        x_TD = embed_tokens(self.embed, tokens_BS, self.tpc)
        x_TD = self.drop(self.ln_embed(absolute_positions(self, x_TD)))
        mask = attention_mask(
            s,
            s,
            causal=False,
            dtype=x_TD.dtype,
            device=x_TD.device,
            key_padding_BK=padding_mask_BS,
            global_positions=stack_globals(self.cfg),
        )
        x_TD = run_blocks(self.blocks, x_TD, mask)
        return self.ln_f(x_TD) if self.ln_f is not None else x_TD

    def logits_parallel(self, h_TD: torch.Tensor) -> torch.Tensor:
        """MLM head: this rank's slice of the vocabulary logits [T, v / tp], all positions."""
        h_TD = self.head_norm(F.gelu(self.head_dense(h_TD)))
        return lm_logits(h_TD, self.tpc, self.head, self.embed.weight) + self.out_bias

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        loss_tokens: torch.Tensor | None = None,
    ):
        """Mean cross-entropy over positions where loss_mask is 1 (every position without a
        loss_mask) when targets are given, else full logits [b, s, v]. padding_mask [b, s] is
        True at real tokens; padded keys are never attended to."""
        s = tokens.shape[1]
        pad = sequence_parallel_pad(s, self.tpc)
        if pad:  # bidirectional, so pad keys are masked out and pad positions left unscored
            real = torch.ones_like(tokens, dtype=torch.bool)
            padding_mask = pad_to_multiple(real if padding_mask is None else padding_mask, pad)
            tokens = pad_to_multiple(tokens, pad)
            if targets is not None:
                scored = torch.ones_like(targets, dtype=torch.float32)
                loss_mask = pad_to_multiple(scored if loss_mask is None else loss_mask, pad)
                targets = pad_to_multiple(targets, pad)
        logits_TV = self.logits_parallel(self.hidden(tokens, padding_mask))
        if targets is None:
            return full_logits(logits_TV, self.tpc, s)
        return lm_loss(logits_TV, targets, loss_mask, self.tpc, loss_tokens)
