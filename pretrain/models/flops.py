"""Parameter counts and training FLOPs per token, from the config alone (no torch).

Used for MFU and for scaling-law fits, where N conventionally excludes embeddings.
"""

from __future__ import annotations

from pretrain.config import ModelConfig


def _vocab(cfg: ModelConfig) -> int:
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size must be resolved before counting parameters")
    return cfg.vocab_size


def block_params(cfg: ModelConfig) -> int:
    """Parameters of one transformer block."""
    d, f, b = cfg.d_model, cfg.ffn_size, int(cfg.bias)
    attn = 3 * d * d + 3 * d * b + d * d + d * b
    mlp = d * f + f * b + f * d + d * b
    norms = 2 * (d + d * b)
    return attn + mlp + norms


def param_count(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Total trainable parameters (tied weights counted once); without embeddings: the
    non-embedding count N of the scaling-law literature (blocks and final norm)."""
    d = cfg.d_model
    body = cfg.n_layers * block_params(cfg) + d + d * int(cfg.bias)
    if not embeddings:
        return body
    emb = _vocab(cfg) * d + (cfg.seq_len * d if cfg.positions == "learned" else 0)
    head = 0 if cfg.tie_embeddings else _vocab(cfg) * d
    return body + emb + head


def flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per token: 6 per weight of every matrix multiply (forward 2, backward 4),
    the output projection included even when tied, plus the attention score and value products
    (6 * 2 * n_layers * seq_len * d_model, counted over the full causal square as PaLM does)."""
    d, f = cfg.d_model, cfg.ffn_size
    matmul_weights = cfg.n_layers * (4 * d * d + 2 * d * f) + _vocab(cfg) * d
    attention = 12 * cfg.n_layers * cfg.seq_len * d
    return 6 * matmul_weights + attention
