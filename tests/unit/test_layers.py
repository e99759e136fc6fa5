"""The shared layers against naive reference implementations written out here: attention
(multi-head, grouped-query, multi-query; causal, padding, documents, cross-attention, T5's
unscaled scores with a position bias), T5's relative position buckets, gated MLPs, norms and
sinusoidal positions. Every comparison has a negative control that the reference would catch."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.models.layers import (
    MLP,
    Attention,
    AttentionMask,
    Block,
    RelativePositionBias,
    TensorParallel,
    attention_mask,
    build_norm,
    relative_position_bucket,
    sinusoidal_table,
)

CFG = ModelConfig(n_layers=2, d_model=48, n_heads=6, seq_len=16, vocab_size=64)
HEADS = {"mha": None, "gqa": 3, "gqa2": 2, "mqa": 1}


def tpc(world1) -> TensorParallel:
    return TensorParallel.build(world1)


def randomize_biases(module: torch.nn.Module) -> None:
    """Biases start at zero; random ones make the references check them too."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)


def make_attention(world1, n_kv_heads, cross=False, **kw) -> Attention:
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, n_kv_heads=n_kv_heads)
    attn = Attention(cfg, tpc(world1), n_layers=2, cross=cross, **kw).eval()
    randomize_biases(attn)
    return attn


# --- the reference ------------------------------------------------------------------------------


def split_fused_qkv(attn: Attention, n_heads: int, n_kv: int):
    """Per-head query and per-KV-head key/value weights and biases, read from the documented
    layout [group, (q_1 .. q_per_group, k, v), head size]."""
    e, per = attn.head_dim, n_heads // n_kv
    w = attn.qkv.weight.view(n_kv, per + 2, e, -1)
    b = attn.qkv.bias.view(n_kv, per + 2, e)
    q = [(w[i // per, i % per], b[i // per, i % per]) for i in range(n_heads)]
    k = [(w[j, per], b[j, per]) for j in range(n_kv)]
    v = [(w[j, per + 1], b[j, per + 1]) for j in range(n_kv)]
    return q, k, v


def split_cross(attn: Attention, n_heads: int, n_kv: int):
    e = attn.head_dim
    wq, bq = attn.q.weight.view(n_heads, e, -1), attn.q.bias.view(n_heads, e)
    wkv, bkv = attn.kv.weight.view(n_kv, 2, e, -1), attn.kv.bias.view(n_kv, 2, e)
    q = [(wq[i], bq[i]) for i in range(n_heads)]
    k = [(wkv[j, 0], bkv[j, 0]) for j in range(n_kv)]
    v = [(wkv[j, 1], bkv[j, 1]) for j in range(n_kv)]
    return q, k, v


def naive_attention(
    attn: Attention,
    x_BSD: torch.Tensor,
    *,
    n_heads: int,
    n_kv: int,
    allowed_BQK: torch.Tensor | None = None,
    memory_BSD: torch.Tensor | None = None,
    scale: float | None = None,
    bias_HQK: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loops over batch and heads: q_i k_j^T * scale (+ bias), -inf where not allowed, softmax,
    weighted sum of v; query head i reads key/value head i // (n_heads / n_kv)."""
    kv_src = x_BSD if memory_BSD is None else memory_BSD
    if memory_BSD is None:
        q_w, k_w, v_w = split_fused_qkv(attn, n_heads, n_kv)
    else:
        q_w, k_w, v_w = split_cross(attn, n_heads, n_kv)
    e = attn.head_dim
    scale = 1 / math.sqrt(e) if scale is None else scale
    per = n_heads // n_kv
    outs = []
    for bi in range(x_BSD.shape[0]):
        x, m = x_BSD[bi], kv_src[bi]
        heads = []
        for i in range(n_heads):
            q = x @ q_w[i][0].T + q_w[i][1]
            k = m @ k_w[i // per][0].T + k_w[i // per][1]
            v = m @ v_w[i // per][0].T + v_w[i // per][1]
            scores = q @ k.T * scale
            if bias_HQK is not None:
                scores = scores + bias_HQK[i]
            if allowed_BQK is not None:
                scores = scores.masked_fill(~allowed_BQK[bi], float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v)
        outs.append(torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias)
    return torch.stack(outs)


def causal_allowed(b: int, s: int) -> torch.Tensor:
    return torch.ones(s, s, dtype=torch.bool).tril().expand(b, s, s)


def close(a, b) -> float:
    return (a - b).abs().max().item()


# --- self-attention ---------------------------------------------------------------------------


@pytest.mark.parametrize("heads", list(HEADS))
def test_causal_attention_matches_reference(world1, heads):
    n_kv = HEADS[heads] or CFG.n_heads
    attn = make_attention(world1, HEADS[heads])
    x = torch.randn(3, 10, CFG.d_model)  # the TP=1 stream: [b, s, d]
    with torch.no_grad():
        got = attn(x, AttentionMask(causal=True))  # the is_causal fast path
        want = naive_attention(attn, x, n_heads=6, n_kv=n_kv, allowed_BQK=causal_allowed(3, 10))
        unmasked = naive_attention(attn, x, n_heads=6, n_kv=n_kv)
    assert close(got, want) < 1e-5
    assert close(got, unmasked) > 1e-3  # negative control: the mask matters


@pytest.mark.parametrize("heads", list(HEADS))
def test_padding_mask_matches_reference(world1, heads):
    n_kv = HEADS[heads] or CFG.n_heads
    attn = make_attention(world1, HEADS[heads])
    x = torch.randn(2, 10, CFG.d_model)
    padding = torch.ones(2, 10, dtype=torch.bool)
    padding[0, 7:] = False
    padding[1, 4:] = False
    mask = attention_mask(
        10, 10, causal=False, dtype=x.dtype, device=x.device, key_padding_BK=padding
    )
    allowed = padding[:, None, :].expand(2, 10, 10)
    with torch.no_grad():
        got = attn(x, mask)
        want = naive_attention(attn, x, n_heads=6, n_kv=n_kv, allowed_BQK=allowed)
        unmasked = naive_attention(attn, x, n_heads=6, n_kv=n_kv)
    assert close(got, want) < 1e-5
    assert close(got, unmasked) > 1e-3


def test_document_mask_matches_reference(world1):
    attn = make_attention(world1, 3)
    x = torch.randn(2, 12, CFG.d_model)
    docs = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 12])
    mask = attention_mask(12, 12, causal=True, dtype=x.dtype, device=x.device, doc_ids_BS=docs)
    allowed = causal_allowed(2, 12) & (docs[:, :, None] == docs[:, None, :])
    with torch.no_grad():
        got = attn(x, mask)
        want = naive_attention(attn, x, n_heads=6, n_kv=3, allowed_BQK=allowed)
        causal_only = naive_attention(attn, x, n_heads=6, n_kv=3, allowed_BQK=causal_allowed(2, 12))
    assert close(got, want) < 1e-5
    # Negative control: the first sequence crosses documents without the mask; the second is
    # one document, where both agree.
    assert close(got[0], causal_only[0]) > 1e-3
    assert close(got[1], causal_only[1]) < 1e-5


def test_masked_key_does_not_change_outputs(world1):
    """Changing the input at a padded position leaves every real position's output as it was;
    without the mask it changes them (the negative control)."""
    attn = make_attention(world1, 2)
    x = torch.randn(2, 8, CFG.d_model)
    padding = torch.ones(2, 8, dtype=torch.bool)
    padding[:, 6:] = False
    mask = attention_mask(
        8, 8, causal=False, dtype=x.dtype, device=x.device, key_padding_BK=padding
    )
    y = x.clone()
    y[:, 6:] += 5.0 * torch.randn_like(y[:, 6:])
    with torch.no_grad():
        a, b = attn(x, mask), attn(y, mask)
        a_open, b_open = attn(x, AttentionMask()), attn(y, AttentionMask())
    assert close(a[:, :6], b[:, :6]) < 1e-6
    assert close(a_open[:, :6], b_open[:, :6]) > 1e-3


def test_causal_mask_hides_the_future(world1):
    attn = make_attention(world1, None)
    x = torch.randn(2, 8, CFG.d_model)
    y = x.clone()
    y[:, 5:] += torch.randn_like(y[:, 5:])
    with torch.no_grad():
        a, b = attn(x, AttentionMask(causal=True)), attn(y, AttentionMask(causal=True))
        a_open, b_open = attn(x, AttentionMask()), attn(y, AttentionMask())
    assert close(a[:, :5], b[:, :5]) < 1e-6
    assert close(a_open[:, :5], b_open[:, :5]) > 1e-3


def test_fully_masked_row_stays_finite(world1):
    attn = make_attention(world1, None)
    x = torch.randn(1, 4, CFG.d_model)
    nothing = torch.zeros(1, 4, dtype=torch.bool)
    mask = attention_mask(
        4, 4, causal=False, dtype=x.dtype, device=x.device, key_padding_BK=nothing
    )
    with torch.no_grad():
        assert torch.isfinite(attn(x, mask)).all()


@pytest.mark.parametrize("heads", ["mha", "gqa", "mqa"])
def test_cross_attention_matches_reference(world1, heads):
    n_kv = HEADS[heads] or CFG.n_heads
    attn = make_attention(world1, HEADS[heads], cross=True)
    x, memory = torch.randn(2, 5, CFG.d_model), torch.randn(2, 9, CFG.d_model)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[1, 6:] = False
    mask = attention_mask(
        5, 9, causal=False, dtype=x.dtype, device=x.device, key_padding_BK=padding
    )
    allowed = padding[:, None, :].expand(2, 5, 9)
    with torch.no_grad():
        got = attn(x, mask, memory)
        want = naive_attention(
            attn, x, n_heads=6, n_kv=n_kv, allowed_BQK=allowed, memory_BSD=memory
        )
        self_attention = naive_attention(attn, memory, n_heads=6, n_kv=n_kv, memory_BSD=memory)
    assert got.shape == (2, 5, CFG.d_model)
    assert close(got, want) < 1e-5
    assert close(got, self_attention[:, :5]) > 1e-3  # the queries come from x, not the memory


def test_unscaled_attention_with_position_bias(world1):
    """T5: scores are q.k without 1/sqrt(head size), plus the relative position bias."""
    attn = make_attention(world1, None, scale=1.0)
    x = torch.randn(2, 7, CFG.d_model)
    bias = torch.randn(1, 6, 7, 7)
    mask = attention_mask(
        7, 7, causal=True, dtype=x.dtype, device=x.device, position_bias_1HQK=bias
    )
    with torch.no_grad():
        got = attn(x, mask)
        want = naive_attention(
            attn,
            x,
            n_heads=6,
            n_kv=6,
            allowed_BQK=causal_allowed(2, 7),
            scale=1.0,
            bias_HQK=bias[0],
        )
        scaled = naive_attention(
            attn, x, n_heads=6, n_kv=6, allowed_BQK=causal_allowed(2, 7), bias_HQK=bias[0]
        )
    assert close(got, want) < 1e-4
    assert close(got, scaled) > 1e-3


def test_t5_query_init_is_scaled(world1):
    """q_init_std applies to the query rows of the fused weight only."""
    torch.manual_seed(0)
    big = dataclasses.replace(CFG, d_model=192, n_heads=6, init_std=0.5)
    attn = Attention(big, tpc(world1), n_layers=2, q_init_std=0.05)
    w = attn.qkv.weight.view(6, 3, 32, 192)
    assert w[:, 0].std().item() == pytest.approx(0.05, rel=0.1)
    assert w[:, 1:].std().item() == pytest.approx(0.5, rel=0.1)


# --- relative position bias -------------------------------------------------------------------


def t5_bucket(relative_position: int, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's _relative_position_bucket for one offset (memory position - query position),
    written from the Mesh TensorFlow formula with scalars and math.log."""
    ret = 0
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            ret += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    )
    return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets, distance", [(32, 128), (8, 16)])
def test_relative_bucket_matches_t5_formula(bidirectional, buckets, distance):
    offsets = torch.arange(-300, 301)
    got = relative_position_bucket(offsets, bidirectional, buckets, distance).tolist()
    want = [t5_bucket(int(o), bidirectional, buckets, distance) for o in offsets]
    assert got == want
    assert max(want) == buckets - 1  # far offsets share the last bucket
    # Negative control: the other direction convention buckets differently.
    assert got != [t5_bucket(-int(o), bidirectional, buckets, distance) for o in offsets]


def test_relative_position_bias_reads_the_bucket_table(world1):
    cfg = dataclasses.replace(CFG, family="t5", positions="relative", rel_buckets=8)
    torch.manual_seed(0)
    rpb = RelativePositionBias(cfg, tpc(world1), bidirectional=False)
    bias = rpb(5, 6)
    assert bias.shape == (1, 6, 5, 6)
    for q in range(5):
        for k in range(6):
            bucket = t5_bucket(k - q, False, 8, cfg.rel_max_distance)
            torch.testing.assert_close(bias[0, :, q, k], rpb.weight[bucket])


# --- MLP, norms, positions --------------------------------------------------------------------


@pytest.mark.parametrize("activation, gate", [("swiglu", F.silu), ("geglu", F.gelu)])
def test_gated_mlp_matches_reference(world1, activation, gate):
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, activation=activation, ffn_hidden=40)
    mlp = MLP(cfg, tpc(world1), n_layers=2)
    randomize_biases(mlp)
    x = torch.randn(5, 2, CFG.d_model)
    # The documented layout interleaves gate and up features: [g_0, u_0, g_1, u_1, ...].
    w_gate, w_up = mlp.up.weight[0::2], mlp.up.weight[1::2]
    b_gate, b_up = mlp.up.bias[0::2], mlp.up.bias[1::2]
    with torch.no_grad():
        got = mlp(x)
        h = gate(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)
        want = h @ mlp.down.weight.T + mlp.down.bias
        # Negative control: reading the fused weight as [all gates | all ups] is different.
        h_halves = gate(x @ mlp.up.weight[:40].T) * (x @ mlp.up.weight[40:].T)
    assert mlp.up.weight.shape == (80, CFG.d_model)
    assert close(got, want) < 1e-5
    assert close(got, h_halves @ mlp.down.weight.T + mlp.down.bias) > 1e-3


@pytest.mark.parametrize("activation, fn", [("gelu", F.gelu), ("relu", F.relu)])
def test_plain_mlp_matches_reference(world1, activation, fn):
    torch.manual_seed(0)
    mlp = MLP(dataclasses.replace(CFG, activation=activation), tpc(world1), n_layers=2)
    randomize_biases(mlp)
    x = torch.randn(5, 2, CFG.d_model)
    with torch.no_grad():
        want = fn(x @ mlp.up.weight.T + mlp.up.bias) @ mlp.down.weight.T + mlp.down.bias
        assert close(mlp(x), want) < 1e-5


def test_rmsnorm_matches_reference(world1):
    norm = build_norm(dataclasses.replace(CFG, norm="rmsnorm", norm_eps=1e-6), tpc(world1))
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 3, CFG.d_model) * 3 + 1
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert close(norm(x), want) < 1e-5
    assert list(dict(norm.named_parameters())) == ["weight"]  # no bias
    layer = build_norm(CFG, tpc(world1))
    assert close(layer(x), want) > 1e-2  # LayerNorm also subtracts the mean


def test_post_ln_block_normalizes_after_the_residual(world1):
    torch.manual_seed(0)
    post = Block(dataclasses.replace(CFG, norm_position="post"), tpc(world1), n_layers=2).eval()
    x = torch.randn(6, 2, CFG.d_model)
    mask = AttentionMask(causal=False)
    with torch.no_grad():
        h = post.ln_attn(x + post.attn(x, mask))
        want = post.ln_mlp(h + post.mlp(h))
        got = post(x, mask)
        pre = x + post.attn(post.ln_attn(x), mask)
        pre = pre + post.mlp(post.ln_mlp(pre))
    assert close(got, want) < 1e-5
    assert close(got, pre) > 1e-3


def test_sinusoidal_table_matches_the_formula():
    table = sinusoidal_table(50, 16)
    for pos in (0, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_loss_refuses_a_model_built_for_another_tp_group(world1):
    """megatron's cross-entropy reduces over its global TP group (of 1 here); a model that
    claims 2 ranks gets an error instead of a silently wrong loss."""
    from pretrain.models.layers import lm_loss, parallel_config

    logits, targets = torch.randn(2, 4, 10), torch.randint(0, 10, (2, 4))  # [b, s, v], [b, s]
    want = F.cross_entropy(logits.reshape(-1, 10), targets.reshape(-1))
    torch.testing.assert_close(lm_loss(logits, targets, None, tpc(world1)), want)
    claims_two = TensorParallel(world1, 2, False, parallel_config(2))
    with pytest.raises(ValueError, match="megatron's tensor-parallel group has 1 ranks"):
        lm_loss(logits, targets, None, claims_two)
