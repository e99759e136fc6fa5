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
from pretrain.models.collectives import gather_last_dim, gather_sequence
from pretrain.models.layers import (
    Block,
    ParallelModel,
    add_positions,
    attach_positions,
    attention_mask,
    build_norm,
    column_linear,
    embed_tokens,
    lm_loss,
    mark_sequence_parallel,
    normal_init,
    pad_to_multiple,
    run_blocks,
    token_embedding,
)


class BERT(ParallelModel):
    def __init__(
        self,
        cfg: ModelConfig,
        tp_group: Any,
        tp_size: int = 1,
        sequence_parallel: bool = False,
    ):
        super().__init__(cfg, tp_group, tp_size, sequence_parallel)
        tpc = self.tpc
        self.embed = token_embedding(cfg, tpc)
        rotary = attach_positions(self, cfg, tpc)
        self.ln_embed = build_norm(cfg, tpc)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg, tpc, n_layers=cfg.n_layers, rotary=rotary) for _ in range(cfg.n_layers)
        )
        self.ln_f = build_norm(cfg, tpc) if cfg.norm_position == "pre" else None
        # The MLM head's transform is replicated on every TP rank (as in megatron's BertLMHead):
        # a d x d matrix is small next to the vocabulary projection.
        self.head_dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        normal_init(cfg.init_std)(self.head_dense.weight)
        if cfg.bias:
            nn.init.zeros_(self.head_dense.bias)
        if tpc.sequence_parallel:
            mark_sequence_parallel(self.head_dense.weight, self.head_dense.bias)
        self.head_norm = build_norm(cfg, tpc)
        self.head = None
        if not cfg.tie_embeddings:
            self.head = column_linear(
                cfg.d_model, cfg.vocab_size, False, normal_init(cfg.init_std), tpc
            )
        # The output bias is split over the vocabulary like the logits it is added to.
        self.out_bias = nn.Parameter(torch.zeros(self.embed.num_embeddings_per_partition))
        tp.set_tensor_model_parallel_attributes(self.out_bias, True, 0, 1)

    def hidden(self, tokens_BS: torch.Tensor, padding_mask_BS: torch.Tensor | None = None):
        """Encoder output [s, b, d] (this rank's shard under sequence parallelism)."""
        s = tokens_BS.shape[1]
        if s > self.cfg.seq_len:
            raise ValueError(f"sequence of {s} tokens exceeds model.seq_len={self.cfg.seq_len}")
        x_SBD = embed_tokens(self.embed, tokens_BS, self.tpc)
        if self.pos_embed is not None:
            x_SBD = add_positions(x_SBD, self.pos_embed.weight, s, self.tpc)
        elif self.cfg.positions == "sinusoidal":
            x_SBD = add_positions(x_SBD, self.pos_table, s, self.tpc)
        x_SBD = self.drop(self.ln_embed(x_SBD))
        mask = attention_mask(
            s,
            s,
            causal=False,
            dtype=x_SBD.dtype,
            device=x_SBD.device,
            key_padding_BK=padding_mask_BS,
        )
        x_SBD = run_blocks(self.blocks, x_SBD, self.cfg.activation_checkpointing, mask)
        return self.ln_f(x_SBD) if self.ln_f is not None else x_SBD

    def logits_parallel(self, h_SBD: torch.Tensor) -> torch.Tensor:
        """MLM head: this rank's slice of the vocabulary logits [s, b, v / tp], all positions."""
        h_SBD = self.head_norm(F.gelu(self.head_dense(h_SBD)))
        if self.tpc.sequence_parallel:
            h_SBD = gather_sequence(h_SBD, self.tpc.group)
        elif self.head is None:
            h_SBD = tp.copy_to_tensor_model_parallel_region(h_SBD, group=self.tpc.group)
        if self.head is not None:
            logits, _ = self.head(h_SBD)
        else:
            logits = F.linear(h_SBD, self.embed.weight)
        return logits + self.out_bias

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ):
        """Mean cross-entropy over positions where loss_mask is 1 (every position without a
        loss_mask) when targets are given, else full logits [b, s, v]. padding_mask [b, s] is
        True at real tokens; padded keys are never attended to."""
        s = tokens.shape[1]
        pad = -s % self.tpc.size if self.tpc.sequence_parallel else 0
        if pad:  # bidirectional, so pad keys are masked out and pad positions left unscored
            real = torch.ones_like(tokens, dtype=torch.bool)
            padding_mask = pad_to_multiple(real if padding_mask is None else padding_mask, pad)
            tokens = pad_to_multiple(tokens, pad)
            if targets is not None:
                scored = torch.ones_like(targets, dtype=torch.float32)
                loss_mask = pad_to_multiple(scored if loss_mask is None else loss_mask, pad)
                targets = pad_to_multiple(targets, pad)
        logits_SBV = self.logits_parallel(self.hidden(tokens, padding_mask))
        if targets is None:
            return gather_last_dim(logits_SBV, self.tpc.group).transpose(0, 1)[:, :s]
        return lm_loss(logits_SBV, targets, loss_mask, self.tpc)
