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

from pretrain.config import ModelConfig
from pretrain.models.layers import (
    Block,
    ParallelModel,
    RelativePositionBias,
    ResidualDropout,
    TensorParallel,
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
    stream_length,
    token_embedding,
)


@dataclass
class EncoderOutput:
    """The encoder's final states [b, s_enc, d] ([s_enc / tp, b, d], this rank's shard, under
    sequence parallelism)
    and the padding mask [b, s_enc] the decoder's cross-attention must apply to them."""

    hidden_TD: torch.Tensor
    padding_mask_BS: torch.Tensor | None


def t5_units(cfg: ModelConfig) -> dict[str, int]:
    """The init unit (layers.unit_init) of each part of a T5; blocks number from their
    stack's entry on."""
    n_enc, n_dec = cfg.n_layers, cfg.decoder_layers
    return {
        "embed": 0,
        "enc_bias": 1,
        "encoder": 2,
        "dec_bias": 2 + n_enc,
        "decoder": 3 + n_enc,
        "head": 3 + n_enc + n_dec,
    }


def t5_embedding(cfg: ModelConfig, tpc: TensorParallel):
    """T5's init: embeddings N(0, 1), which the d_model**-0.5 of the tied output brings back
    to unit-scale logits; an untied head gets fan-in scaling to the same effect (t5_head)."""
    return token_embedding(cfg, tpc, std=1.0)


def t5_head(cfg: ModelConfig, tpc: TensorParallel):
    return lm_head(cfg, tpc, std=cfg.d_model**-0.5)


def t5_block(cfg: ModelConfig, tpc: TensorParallel, *, cross: bool) -> Block:
    """Unscaled scores q.k with the query init scaled by head_size**-0.5 start out like
    scaled dot-product attention (Mesh TensorFlow's T5 convention)."""
    n = cfg.decoder_layers if cross else cfg.n_layers
    q_std = cfg.init_std * cfg.head_dim**-0.5
    return Block(cfg, tpc, n_layers=n, cross=cross, scale=1.0, q_init_std=q_std)


def t5_logits(h_TD, tpc: TensorParallel, head=None, weight=None) -> torch.Tensor:
    """Decoder logits; tied, T5 rescales the decoder output so the embedding serves both ends."""
    if head is not None:
        return lm_logits(h_TD, tpc, head)
    return lm_logits(h_TD * h_TD.shape[-1] ** -0.5, tpc, None, weight)  # d_model**-0.5


class T5(ParallelModel):
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
        n_enc, n_dec = cfg.n_layers, cfg.decoder_layers
        # Units with their own init seeds (t5_units), numbered as the pipeline's layers.
        units = t5_units(cfg)
        with self.unit(units["embed"]):
            self.embed = t5_embedding(cfg, tpc)
        with self.unit(units["enc_bias"]):
            self.enc_bias = RelativePositionBias(cfg, tpc, bidirectional=True)
        with self.unit(units["dec_bias"]):
            self.dec_bias = RelativePositionBias(cfg, tpc, bidirectional=False)
        self.encoder = self.stack(units["encoder"], n_enc, lambda: t5_block(cfg, tpc, cross=False))
        self.decoder = self.stack(units["decoder"], n_dec, lambda: t5_block(cfg, tpc, cross=True))
        pre = cfg.norm_position == "pre"
        self.enc_norm = build_norm(cfg, tpc) if pre else None
        self.dec_norm = build_norm(cfg, tpc) if pre else None
        self.drop = ResidualDropout(cfg.dropout, tpc)
        self.head = None
        if not cfg.tie_embeddings:
            with self.unit(units["head"]):
                self.head = t5_head(cfg, tpc)

    def _pad(self, tokens_BS: torch.Tensor, padding_BS: torch.Tensor | None):
        """Pad a sequence to a multiple of the TP size under sequence parallelism, with the
        padding marked as such (so no real position attends to it)."""
        pad = sequence_parallel_pad(tokens_BS.shape[1], self.tpc)
        if not pad:
            return tokens_BS, padding_BS, 0
        real = torch.ones_like(tokens_BS, dtype=torch.bool) if padding_BS is None else padding_BS
        return pad_to_multiple(tokens_BS, pad), pad_to_multiple(real, pad), pad

    def encode(
        self, enc_tokens: torch.Tensor, enc_padding_mask: torch.Tensor | None = None
    ) -> EncoderOutput:
        enc_tokens, enc_padding_mask, _ = self._pad(enc_tokens, enc_padding_mask)
        s = enc_tokens.shape[1]
        x_TD = self.drop(embed_tokens(self.embed, enc_tokens, self.tpc))
        mask = attention_mask(
            s,
            s,
            causal=False,
            dtype=x_TD.dtype,
            device=x_TD.device,
            key_padding_BK=enc_padding_mask,
            position_bias_1HQK=self.enc_bias(s, s),
        )
        x_TD = run_blocks(self.encoder, x_TD, mask)
        if self.enc_norm is not None:
            x_TD = self.enc_norm(x_TD)
        return EncoderOutput(self.drop(x_TD), enc_padding_mask)

    def decode_parallel(
        self,
        dec_tokens: torch.Tensor,
        memory: EncoderOutput,
        dec_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This rank's slice of the decoder's vocabulary logits, [T, v / tp] (layers.py)."""
        s = dec_tokens.shape[1]
        x_TD = self.drop(embed_tokens(self.embed, dec_tokens, self.tpc))
        kw = dict(dtype=x_TD.dtype, device=x_TD.device)
        self_mask = attention_mask(
            s,
            s,
            causal=True,
            key_padding_BK=dec_padding_mask,
            position_bias_1HQK=self.dec_bias(s, s),
            **kw,
        )
        enc = memory.hidden_TD
        s_enc = stream_length(enc, self.tpc)
        cross_mask = attention_mask(
            s, s_enc, causal=False, key_padding_BK=memory.padding_mask_BS, **kw
        )
        x_TD = run_blocks(self.decoder, x_TD, self_mask, enc, cross_mask)
        if self.dec_norm is not None:
            x_TD = self.dec_norm(x_TD)
        return self._logits_parallel(self.drop(x_TD))

    def _logits_parallel(self, h_TD: torch.Tensor) -> torch.Tensor:
        return t5_logits(h_TD, self.tpc, self.head, self.embed.weight)

    def decode(
        self,
        dec_tokens: torch.Tensor,
        memory: EncoderOutput,
        dec_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Full decoder logits [b, s_dec, v] (generation)."""
        s = dec_tokens.shape[1]
        dec_tokens, dec_padding_mask, _ = self._pad(dec_tokens, dec_padding_mask)
        logits_TV = self.decode_parallel(dec_tokens, memory, dec_padding_mask)
        return full_logits(logits_TV, self.tpc, s)

    def forward(
        self,
        enc_tokens: torch.Tensor,
        dec_tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        enc_padding_mask: torch.Tensor | None = None,
        dec_padding_mask: torch.Tensor | None = None,
        loss_tokens: torch.Tensor | None = None,
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
        logits_TV = self.decode_parallel(dec_tokens, memory, dec_padding_mask)
        return lm_loss(logits_TV, targets, loss_mask, self.tpc, loss_tokens)
