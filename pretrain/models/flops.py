"""Parameter counts and training FLOPs per token, from the config alone (no torch).

Used for the count printed at start-up, MFU, and scaling-law fits, where N conventionally
excludes embeddings. Every formula mirrors a module in layers.py / gpt.py / bert.py / t5.py;
tests/unit/test_param_counts.py checks them against the built modules and published models.
"""

from __future__ import annotations

from pretrain.config import ModelConfig


def _vocab(cfg: ModelConfig) -> int:
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size must be resolved before counting parameters")
    return cfg.vocab_size


def norm_params(cfg: ModelConfig) -> int:
    """LayerNorm: gain (+ bias); RMSNorm: gain only."""
    d = cfg.d_model
    return d if cfg.norm == "rmsnorm" else d + d * int(cfg.bias)


def attention_params(cfg: ModelConfig) -> int:
    """Query, key, value and output projections (GQA: n_kv_heads key/value heads)."""
    d, e, h, g, b = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.kv_heads, int(cfg.bias)
    qkv = d * (h + 2 * g) * e + (h + 2 * g) * e * b
    out = h * e * d + d * b
    return qkv + out


def mlp_params(cfg: ModelConfig) -> int:
    d, f, b = cfg.d_model, cfg.ffn_size, int(cfg.bias)
    up = 2 * f if cfg.activation in ("swiglu", "geglu") else f
    return d * up + up * b + f * d + d * b


def block_params(cfg: ModelConfig, cross: bool = False) -> int:
    """Parameters of one transformer block (with cross-attention: a T5 decoder block)."""
    n = attention_params(cfg) + mlp_params(cfg) + 2 * norm_params(cfg)
    if cross:
        n += attention_params(cfg) + norm_params(cfg)
    return n


def _final_norm(cfg: ModelConfig) -> int:
    return norm_params(cfg) if cfg.norm_position == "pre" else 0


def non_embedding_params(cfg: ModelConfig) -> int:
    """N of the scaling-law literature: everything but the token and position embeddings and
    the vocabulary-sized output layer (its matrix and bias)."""
    if cfg.family == "t5":
        enc = cfg.n_layers * block_params(cfg) + _final_norm(cfg) + moe_extra_params(cfg)
        dec = cfg.decoder_layers * block_params(cfg, cross=True) + _final_norm(cfg)
        rel_bias = 2 * cfg.rel_buckets * cfg.n_heads
        return enc + dec + rel_bias
    body = cfg.n_layers * block_params(cfg) + _final_norm(cfg) + moe_extra_params(cfg)
    if cfg.family == "bert":
        d = cfg.d_model
        # Embedding norm, and the MLM head's transform: dense d x d (+ bias), norm.
        body += norm_params(cfg) + d * d + d * int(cfg.bias) + norm_params(cfg)
    return body


def moe_layers(cfg: ModelConfig) -> int:
    """Blocks whose MLP is a mixture of experts: every moe_every-th (pretrain.models.moe)."""
    return cfg.n_layers // cfg.moe_every if cfg.moe_experts else 0


def moe_extra_params(cfg: ModelConfig, active: bool = False) -> int:
    """Parameters a mixture of experts adds over the dense model: per MoE layer, the router
    (d_model x experts) and the experts beyond the one the dense MLP counts; `active`: only the
    top_k experts a token passes through."""
    if not cfg.moe_experts:
        return 0
    extra_experts = (cfg.moe_top_k if active else cfg.moe_experts) - 1
    return moe_layers(cfg) * (extra_experts * mlp_params(cfg) + cfg.d_model * cfg.moe_experts)


def embedding_params(cfg: ModelConfig) -> int:
    """Token embedding, learned positions, untied output matrix, BERT's output bias."""
    v, d = _vocab(cfg), cfg.d_model
    n = v * d
    if cfg.positions == "learned":
        n += cfg.seq_len * d
    if not cfg.tie_embeddings:
        n += v * d
    if cfg.family == "bert":
        n += v
    return n


def param_count(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Total trainable parameters (tied weights counted once); without embeddings: the
    non-embedding count N of the scaling-law literature."""
    body = non_embedding_params(cfg)
    return body + embedding_params(cfg) if embeddings else body


def active_param_count(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Parameters one token uses: a mixture-of-experts layer counts its router and top_k of its
    experts (equal to param_count for a dense model)."""
    return param_count(cfg, embeddings) - moe_extra_params(cfg) + moe_extra_params(cfg, True)


def _matmul_weights(cfg: ModelConfig, cross: bool = False) -> int:
    """Weights of one block's matrix multiplies (no biases, no norms)."""
    d, e, h, g, f = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.kv_heads, cfg.ffn_size
    attn = d * (2 * h + 2 * g) * e
    mlp = d * f * (3 if cfg.activation in ("swiglu", "geglu") else 2)
    return attn + mlp + (attn if cross else 0)


def flops_per_token(cfg: ModelConfig, dec_len: int | None = None, embeddings: bool = True) -> int:
    """Training FLOPs per token: 6 per weight of every matrix multiply (forward 2, backward 4)
    (for a mixture of experts: the router and the top_k experts a token is routed to),
    the output projection included even when tied, plus the attention score and value products
    (6 * 2 * n_layers * seq_len * d_model, counted over the full causal square as PaLM does).

    T5: FLOPs of one example (model.seq_len encoder tokens, dec_len decoder tokens; default
    seq_len) divided by its encoder + decoder tokens. A decoder token pays its self-attention
    over dec_len keys and cross-attention over seq_len keys.

    embeddings=False leaves out the output projection (6 * vocab * d_model per token), the
    convention of Kaplan et al. (C = 6N with N non-embedding); Chinchilla counts it.
    """
    d, s = cfg.d_model, cfg.seq_len
    v = _vocab(cfg) if embeddings else 0
    # Mixture of experts (GPT and BERT blocks, T5 encoder blocks): each token pays its router
    # and top_k experts instead of one MLP.
    mlp = d * cfg.ffn_size * (3 if cfg.activation in ("swiglu", "geglu") else 2)
    moe = moe_layers(cfg) * ((cfg.moe_top_k - 1) * mlp + d * cfg.moe_experts)
    if cfg.family != "t5":
        weights = cfg.n_layers * _matmul_weights(cfg) + v * d + moe
        if cfg.family == "bert":
            weights += d * d  # the MLM head's transform
        return 6 * weights + 12 * cfg.n_layers * s * d
    t = dec_len if dec_len is not None else s
    enc = s * (6 * (cfg.n_layers * _matmul_weights(cfg) + moe) + 12 * cfg.n_layers * s * d)
    dec_weights = cfg.decoder_layers * _matmul_weights(cfg, cross=True) + v * d
    dec = t * (6 * dec_weights + 12 * cfg.decoder_layers * (t + s) * d)
    return (enc + dec) // (s + t)
