"""Decoder-only GPT: token (+ absolute position) embedding, causal blocks, a final norm (pre-LN),
and an output projection tied to the token embedding by default.

The options cover GPT-2/3 (learned positions, LayerNorm, GELU, biases) and Llama (rotary,
RMSNorm, SwiGLU, grouped-query attention, no biases). A pure nn.Module: it knows its
tensor-parallel group (through the megatron layers) and nothing of engines, optimizers or
trainers. With targets the forward returns the mean cross-entropy, computed vocab-parallel so
full logits are never gathered in training.
"""

from __future__ import annotations

from typing import Any

import torch

from pretrain.config import ModelConfig
from pretrain.models.attention import set_windows
from pretrain.models.layers import (
    Block,
    ParallelModel,
    ResidualDropout,
    absolute_positions,
    attach_positions,
    attention_mask,
    build_norm,
    embed_tokens,
    full_logits,
    lm_head,
    lm_logits,
    lm_loss,
    pad_to_multiple,
    run_blocks,
    sequence_parallel_pad,
    token_embedding,
)


class GPT(ParallelModel):
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
        # Units, each initialised from its own seed (layers.unit_init), numbered as the
        # pipeline's layers are (pretrain.models.pipeline): 0 token embedding, 1 positions,
        # 2.. blocks, then the untied head.
        with self.unit(0):
            self.embed = token_embedding(cfg, tpc)
        with self.unit(1):
            rotary = attach_positions(self, cfg, tpc)
        self.drop = ResidualDropout(cfg.dropout, tpc)
        self.blocks = self.stack(
            2, cfg.n_layers, lambda: Block(cfg, tpc, n_layers=cfg.n_layers, rotary=rotary)
        )
        set_windows(self.blocks, cfg)
        # Post-LN blocks end in a norm already; pre-LN stacks need one before the logits.
        self.ln_f = build_norm(cfg, tpc) if cfg.norm_position == "pre" else None
        self.head = None
        if not cfg.tie_embeddings:
            with self.unit(2 + cfg.n_layers):
                self.head = lm_head(cfg, tpc)

    def hidden(self, tokens_BS: torch.Tensor, doc_ids_BS: torch.Tensor | None = None):
        """Final hidden states [b, s, d] ([s / tp, b, d], this rank's sequence shard, under sequence
        parallelism) for token ids [b, s]."""
        s = tokens_BS.shape[1]
        if s > self.cfg.seq_len:
            raise ValueError(f"sequence of {s} tokens exceeds model.seq_len={self.cfg.seq_len}")
        if self.tpc.sequence_parallel and s % self.tpc.size:
            raise ValueError(
                f"sequence parallelism splits the sequence over {self.tpc.size} ranks; "
                f"{s} tokens do not divide"
            )
        x_TD = embed_tokens(self.embed, tokens_BS, self.tpc)
        x_TD = self.drop(absolute_positions(self, x_TD))
        mask = attention_mask(
            s, s, causal=True, dtype=x_TD.dtype, device=x_TD.device, doc_ids_BS=doc_ids_BS
        )
        x_TD = run_blocks(self.blocks, x_TD, mask)
        return self.ln_f(x_TD) if self.ln_f is not None else x_TD

    def logits_parallel(self, h_TD: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the vocabulary logits, [T, v / tp] (layers.py), for the whole
        sequence."""
        return lm_logits(h_TD, self.tpc, self.head, self.embed.weight)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        loss_tokens: torch.Tensor | None = None,
    ):
        """Mean next-token cross-entropy when targets are given, else full logits [b, s, v].

        tokens and targets are [b, s] ids; doc_ids [b, s] (optional) keeps attention inside each
        document of a packed sequence; loss_mask [b, s] (optional) scores only where it is 1;
        loss_tokens (optional) turns the mean into a token-weighted share of the step (lm_loss).
        The names are the keys of the loader's causal batches, which the trainer passes as
        keyword arguments.
        """
        if targets is None and self.tpc.sequence_parallel:
            return self._logits_any_length(tokens, doc_ids)
        logits_TV = self.logits_parallel(self.hidden(tokens, doc_ids))
        if targets is None:
            return full_logits(logits_TV, self.tpc)
        return lm_loss(logits_TV, targets, loss_mask, self.tpc, loss_tokens)

    def _logits_any_length(self, tokens_BS: torch.Tensor, doc_ids_BS: torch.Tensor | None):
        """Logits for a prompt whose length need not divide by the TP size (generation under
        sequence parallelism): pad at the end, which a causal model's earlier positions never
        see, and drop the padding's logits."""
        s = tokens_BS.shape[1]
        pad = sequence_parallel_pad(s, self.tpc)
        if pad and s + pad > self.cfg.seq_len:
            raise ValueError(
                f"{s} tokens padded to {s + pad} for sequence parallelism exceed "
                f"model.seq_len={self.cfg.seq_len}"
            )
        tokens_BS = pad_to_multiple(tokens_BS, pad)
        if doc_ids_BS is not None:
            doc_ids_BS = pad_to_multiple(doc_ids_BS, pad, value=-1)
        logits_TV = self.logits_parallel(self.hidden(tokens_BS, doc_ids_BS))
        return full_logits(logits_TV, self.tpc, s)
