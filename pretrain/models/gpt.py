"""Decoder-only GPT: token (+ learned position) embedding, pre-LN blocks, final LayerNorm, and an
output projection tied to the token embedding by default.

A pure nn.Module: it knows its tensor-parallel group (through the megatron layers) and nothing
of engines, optimizers or trainers. Inputs are token ids [b, s]; with targets the forward returns
the mean cross-entropy, computed vocab-parallel so full logits are never gathered in training.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import tensor_parallel as tp
from torch import nn

from pretrain.config import ModelConfig
from pretrain.models.layers import Block, RotaryEmbedding, normal_init, parallel_config


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group: Any, tp_size: int = 1):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("GPT needs a resolved model.vocab_size (see resolve_vocab_size)")
        self.cfg = cfg
        self.tp_group = tp_group
        mp = parallel_config(tp_size)
        self.embed = tp.VocabParallelEmbedding(
            cfg.vocab_size,
            cfg.d_model,
            init_method=normal_init(cfg.init_std),
            config=mp,
            tp_group=tp_group,
        )
        self.pos_embed = None
        rotary = None
        if cfg.positions == "learned":
            self.pos_embed = nn.Embedding(cfg.seq_len, cfg.d_model)
            normal_init(cfg.init_std)(self.pos_embed.weight)
        else:
            rotary = RotaryEmbedding(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, mp, tp_group, rotary) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.head = None
        if not cfg.tie_embeddings:
            self.head = tp.ColumnParallelLinear(
                cfg.d_model,
                cfg.vocab_size,
                config=mp,
                init_method=normal_init(cfg.init_std),
                bias=False,
                gather_output=False,
                tp_group=tp_group,
            )

    def hidden(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """Final hidden states [s, b, d] for token ids [b, s]."""
        s = tokens_BS.shape[1]
        if s > self.cfg.seq_len:
            raise ValueError(f"sequence of {s} tokens exceeds model.seq_len={self.cfg.seq_len}")
        x_BSD = self.embed(tokens_BS)
        if self.pos_embed is not None:
            x_BSD = x_BSD + self.pos_embed.weight[:s]
        x_SBD = self.drop(x_BSD.transpose(0, 1).contiguous())
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x_SBD = torch.utils.checkpoint.checkpoint(block, x_SBD, use_reentrant=False)
            else:
                x_SBD = block(x_SBD)
        return self.ln_f(x_SBD)

    def logits_parallel(self, h_SBD: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the vocabulary logits, [s, b, v / tp]."""
        if self.head is not None:
            logits, _ = self.head(h_SBD)
            return logits
        # The tied projection reads the full hidden state on every TP rank; the copy makes the
        # backward pass all-reduce its gradient across the group (megatron's parallel_lm_logits).
        h_SBD = tp.copy_to_tensor_model_parallel_region(h_SBD, group=self.tp_group)
        return F.linear(h_SBD, self.embed.weight)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """Mean next-token cross-entropy when targets are given, else full logits [b, s, v].

        tokens and targets are [b, s] ids; the names are the keys of the loader's causal
        batches, which the trainer passes as keyword arguments.
        """
        logits_SBV = self.logits_parallel(self.hidden(tokens))
        if targets is None:
            full = tp.gather_from_tensor_model_parallel_region(logits_SBV, group=self.tp_group)
            return full.transpose(0, 1)
        loss_SB = tp.vocab_parallel_cross_entropy(
            logits_SBV.float(), targets.transpose(0, 1).contiguous()
        )
        return loss_SB.mean()
