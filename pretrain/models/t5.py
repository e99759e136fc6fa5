"""Encoder-decoder T5 (v1.0 by default through the config: ReLU MLP, tied embeddings; v1.1:
gated GELU, untied).

One token embedding shared by encoder and decoder; no absolute positions, but a learned
relative position bias per stack (bidirectional buckets in the encoder, causal ones in the
decoder) shared by that stack's layers; pre-norm RMSNorm without bias; attention scores not
scaled by 1/sqrt(head size) (T5 folds that into the query init instead); decoder blocks with
cross-attention to the encoder output. When the output projection is tied to the embedding the
final decoder state is scaled by d_model**-0.5 first, as T5 does.

The forward takes the loader's `span` batch and returns the mean cross-entropy over the scored
decoder positions; without targets it returns full decoder logits [b, s_dec, v].
"""

from __future__ import annotations

from dataclasses import dataclass
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
    RelativePositionBias,
    attention_mask,
    build_norm,
    column_linear,
    embed_tokens,
    lm_loss,
    normal_init,
    pad_to_multiple,
    run_blocks,
    token_embedding,
)


@dataclass
class EncoderOutput:
    """The encoder's final states [s_enc, b, d] (this rank's shard under sequence parallelism)
    and the padding mask [b, s_enc] the decoder's cross-attention must apply to them."""

    hidden_SBD: torch.Tensor
    padding_mask_BS: torch.Tensor | None


class T5(ParallelModel):
    def __init__(
        self,
        cfg: ModelConfig,
        tp_group: Any,
        tp_size: int = 1,
        sequence_parallel: bool = False,
    ):
        super().__init__(cfg, tp_group, tp_size, sequence_parallel)
        tpc = self.tpc
        # T5's init: embeddings N(0, 1), which the d_model**-0.5 of the tied output brings
        # back to unit-scale logits; an untied head gets fan-in scaling to the same effect.
        self.embed = token_embedding(cfg, tpc, std=1.0)
        self.enc_bias = RelativePositionBias(cfg, tpc, bidirectional=True)
        self.dec_bias = RelativePositionBias(cfg, tpc, bidirectional=False)
        # Unscaled scores q.k with the query init scaled by head_size**-0.5 start out like
        # scaled dot-product attention (Mesh TensorFlow's T5 convention).
        block_kw = dict(scale=1.0, q_init_std=cfg.init_std * cfg.head_dim**-0.5)
        self.encoder = nn.ModuleList(
            Block(cfg, tpc, n_layers=cfg.n_layers, **block_kw) for _ in range(cfg.n_layers)
        )
        n_dec = cfg.decoder_layers
        self.decoder = nn.ModuleList(
            Block(cfg, tpc, n_layers=n_dec, cross=True, **block_kw) for _ in range(n_dec)
        )
        pre = cfg.norm_position == "pre"
        self.enc_norm = build_norm(cfg, tpc) if pre else None
        self.dec_norm = build_norm(cfg, tpc) if pre else None
        self.drop = nn.Dropout(cfg.dropout)
        self.head = None
        if not cfg.tie_embeddings:
            head_init = normal_init(cfg.d_model**-0.5)
            self.head = column_linear(cfg.d_model, cfg.vocab_size, False, head_init, tpc)

    def _pad(self, tokens_BS: torch.Tensor, padding_BS: torch.Tensor | None):
        """Pad a sequence to a multiple of the TP size under sequence parallelism, with the
        padding marked as such (so no real position attends to it)."""
        pad = -tokens_BS.shape[1] % self.tpc.size if self.tpc.sequence_parallel else 0
        if not pad:
            return tokens_BS, padding_BS, 0
        real = torch.ones_like(tokens_BS, dtype=torch.bool) if padding_BS is None else padding_BS
        return pad_to_multiple(tokens_BS, pad), pad_to_multiple(real, pad), pad

    def encode(
        self, enc_tokens: torch.Tensor, enc_padding_mask: torch.Tensor | None = None
    ) -> EncoderOutput:
        enc_tokens, enc_padding_mask, _ = self._pad(enc_tokens, enc_padding_mask)
        s = enc_tokens.shape[1]
        x_SBD = self.drop(embed_tokens(self.embed, enc_tokens, self.tpc))
        mask = attention_mask(
            s,
            s,
            causal=False,
            dtype=x_SBD.dtype,
            device=x_SBD.device,
            key_padding_BK=enc_padding_mask,
            position_bias_1HQK=self.enc_bias(s, s),
        )
        x_SBD = run_blocks(self.encoder, x_SBD, self.cfg.activation_checkpointing, mask)
        if self.enc_norm is not None:
            x_SBD = self.enc_norm(x_SBD)
        return EncoderOutput(self.drop(x_SBD), enc_padding_mask)

    def decode_parallel(
        self,
        dec_tokens: torch.Tensor,
        memory: EncoderOutput,
        dec_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This rank's slice of the decoder's vocabulary logits, [s_dec, b, v / tp]."""
        s = dec_tokens.shape[1]
        x_SBD = self.drop(embed_tokens(self.embed, dec_tokens, self.tpc))
        kw = dict(dtype=x_SBD.dtype, device=x_SBD.device)
        self_mask = attention_mask(
            s,
            s,
            causal=True,
            key_padding_BK=dec_padding_mask,
            position_bias_1HQK=self.dec_bias(s, s),
            **kw,
        )
        enc = memory.hidden_SBD
        s_enc = enc.shape[0] * (self.tpc.size if self.tpc.sequence_parallel else 1)
        cross_mask = attention_mask(
            s, s_enc, causal=False, key_padding_BK=memory.padding_mask_BS, **kw
        )
        x_SBD = run_blocks(
            self.decoder, x_SBD, self.cfg.activation_checkpointing, self_mask, enc, cross_mask
        )
        if self.dec_norm is not None:
            x_SBD = self.dec_norm(x_SBD)
        return self._logits_parallel(self.drop(x_SBD))

    def _logits_parallel(self, h_SBD: torch.Tensor) -> torch.Tensor:
        if self.tpc.sequence_parallel:
            h_SBD = gather_sequence(h_SBD, self.tpc.group)
        elif self.head is None:
            h_SBD = tp.copy_to_tensor_model_parallel_region(h_SBD, group=self.tpc.group)
        if self.head is not None:
            logits, _ = self.head(h_SBD)
            return logits
        # Tied: T5 rescales the decoder output so the embedding can serve both ends.
        return F.linear(h_SBD * self.cfg.d_model**-0.5, self.embed.weight)

    def decode(
        self,
        dec_tokens: torch.Tensor,
        memory: EncoderOutput,
        dec_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Full decoder logits [b, s_dec, v] (generation)."""
        s = dec_tokens.shape[1]
        dec_tokens, dec_padding_mask, _ = self._pad(dec_tokens, dec_padding_mask)
        logits_SBV = self.decode_parallel(dec_tokens, memory, dec_padding_mask)
        return gather_last_dim(logits_SBV, self.tpc.group).transpose(0, 1)[:, :s]

    def forward(
        self,
        enc_tokens: torch.Tensor,
        dec_tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        enc_padding_mask: torch.Tensor | None = None,
        dec_padding_mask: torch.Tensor | None = None,
    ):
        """Mean cross-entropy over the decoder positions where loss_mask is 1 (all without one)
        when targets are given, else full decoder logits [b, s_dec, v]."""
        memory = self.encode(enc_tokens, enc_padding_mask)
        if targets is None:
            return self.decode(dec_tokens, memory, dec_padding_mask)
        dec_tokens, dec_padding_mask, pad = self._pad(dec_tokens, dec_padding_mask)
        if pad:  # the padded decoder positions are not scored
            scored = torch.ones_like(targets, dtype=torch.float32)
            loss_mask = pad_to_multiple(scored if loss_mask is None else loss_mask, pad)
            targets = pad_to_multiple(targets, pad)
        logits_SBV = self.decode_parallel(dec_tokens, memory, dec_padding_mask)
        return lm_loss(logits_SBV, targets, loss_mask, self.tpc)
