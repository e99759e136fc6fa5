"""Attention patterns (pretrain.models.attention) against a naive softmax with hand-built masks:
causal, documents, sliding window, Longformer (local + global), padding; outputs and gradients
in fp32. Also: which kernel the models take, and the windows reaching the model's layers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ConfigError, ModelConfig
from pretrain.models import attention as A
from pretrain.models.bert import BERT
from pretrain.models.gpt import GPT

B, H, S, E = 2, 4, 37, 8


def qkv(groups: int = H, s: int = S, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, s, E, generator=g, requires_grad=True)
    k = torch.randn(B, groups, s, E, generator=g, requires_grad=True)
    v = torch.randn(B, groups, s, E, generator=g, requires_grad=True)
    return q, k, v


def naive(q, k, v, allowed_BQK: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(e) over the allowed keys) v, written out."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed_BQK[:, None], float("-inf"))
    return scores.softmax(-1) @ v


# Hand-built masks: loops over (b, q, k), independent of the code under test.
def hand_mask(s, causal=False, window=None, docs=None, padding=None, globals_=()):
    m = torch.zeros(B, s, s, dtype=torch.bool)
    for b in range(B):
        for i in range(s):
            for j in range(s):
                ok = True
                if causal and j > i:
                    ok = False
                if window is not None and i not in globals_ and j not in globals_:
                    if causal and i - j >= window:
                        ok = False
                    if not causal and abs(i - j) >= window:
                        ok = False
                if docs is not None and docs[b][i] != docs[b][j]:
                    ok = False
                if padding is not None and not padding[b][j]:
                    ok = False
                m[b, i, j] = ok
    return m


DOCS = [[0] * 9 + [1] * 14 + [2] * 2 + [3] * 12, [5] * 30 + [6] * 7]
PAD = [[True] * S, [True] * 25 + [False] * (S - 25)]

# name: (mask fields, window, hand-mask kwargs)
PATTERNS = {
    "causal": (dict(causal=True), None, dict(causal=True)),
    "document": (dict(causal=True, docs=DOCS), None, dict(causal=True, docs=DOCS)),
    "window": (dict(causal=True), 5, dict(causal=True, window=5)),
    "window+document": (dict(causal=True, docs=DOCS), 6, dict(causal=True, window=6, docs=DOCS)),
    "longformer": (
        dict(padding=PAD, globals_=(0, 17)),
        4,
        dict(window=4, padding=PAD, globals_=(0, 17)),
    ),
    "padding": (dict(padding=PAD), None, dict(padding=PAD)),
    "longformer-unpadded": (dict(globals_=(0, 17)), 4, dict(window=4, globals_=(0, 17))),
    "local": (dict(), 4, dict(window=4)),
}


def make_mask(causal=False, docs=None, padding=None, globals_=()) -> A.AttentionMask:
    return A.attention_mask(
        S,
        S,
        causal=causal,
        dtype=torch.float32,
        device=torch.device("cpu"),
        doc_ids_BS=None if docs is None else torch.tensor(docs),
        key_padding_BK=None if padding is None else torch.tensor(padding),
        global_positions=globals_,
    )


def out_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    return out.detach(), grads


def assert_matches(got, want, tol=1e-5):
    (o1, g1), (o2, g2) = got, want
    assert (o1 - o2).abs().max() < tol
    for a, b in zip(g1, g2, strict=True):
        assert (a - b).abs().max() < tol


@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("groups", [H, 2])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_matches_naive_softmax(name, groups, chunk):
    fields, window, hand = PATTERNS[name]
    mask = make_mask(**fields)
    allowed = hand_mask(S, **hand)
    q, k, v = qkv(groups)
    if chunk is None:  # the kernel `attend` picks (chunked on CPU for the structured patterns)

        def ours(q, k, v):
            return A.attend(q, k, v, mask, window=window)
    else:  # the chunked kernel with blocks that do not divide the sequence

        def ours(q, k, v):
            return A.chunked_attention(q, k, v, mask, window=window, chunk=chunk)

    assert_matches(
        out_and_grads(ours, q, k, v), out_and_grads(lambda *t: naive(*t, allowed), q, k, v)
    )


@pytest.mark.parametrize("name", ["window", "longformer", "window+document"])
def test_window_off_by_one_fails(name):
    """Negative control: a reference whose window is one token wider or narrower differs."""
    fields, window, hand = PATTERNS[name]
    q, k, v = qkv()
    got = A.attend(q, k, v, make_mask(**fields), window=window)
    for off in (-1, 1):
        wrong = naive(q, k, v, hand_mask(S, **{**hand, "window": window + off}))
        assert (got - wrong).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["document", "window", "longformer"])
def test_flex_block_mask_matches_naive_forward(name):
    """The GPU path's block mask, run eagerly on the CPU (forward only there)."""
    fields, window, hand = PATTERNS[name]
    q, k, v = (t.detach() for t in qkv())
    with torch.no_grad():
        got = A.flex_attend(q, k, v, make_mask(**fields), window=window, compiled=False)
        want = naive(q, k, v, hand_mask(S, **hand))
    assert (got - want).abs().max() < 1e-5


def test_scores_grow_with_the_window_not_the_sequence(monkeypatch):
    """No score block is larger than block x (block + window) entries per query row: the
    banded kernel (a plain window) and the chunked one (with documents)."""
    shapes = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        shapes.append((q.shape[0] // B, q.shape[2], k.shape[2]))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy)
    q, k, v = qkv(s=200)
    A.attend(q, k, v, A.AttentionMask(causal=True), window=16)
    assert shapes == [(13, 16, 32)]  # 13 blocks of 16 queries (200 padded to 208), 32 keys
    shapes.clear()
    docs = torch.arange(200).div(30, rounding_mode="floor").expand(B, 200)
    A.attend(q, k, v, A.AttentionMask(causal=True, doc_ids_BS=docs), window=16)
    assert max(qs * ks for _, qs, ks in shapes) <= 16 * 31
    assert sum(qs for _, qs, _ in shapes) == 200


# --- the kernel the models take ------------------------------------------------------------------

SMALL = dict(n_layers=2, d_model=32, n_heads=4, seq_len=24, vocab_size=64)


@pytest.fixture
def sdpa_calls(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kw):
        calls.append(kw)
        return sdpa(*args, **kw)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy)
    return calls


def test_causal_gpt_and_unpadded_bert_pass_no_mask(world1, sdpa_calls):
    """The flash-capable calls: GPT with is_causal and no mask tensor; BERT with an all-true
    padding mask (what its batches carry) with no mask at all. Padded BERT does pass one (the
    control that the spy sees masks)."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (2, 24))
    GPT(ModelConfig(**SMALL), world1)(tokens)
    assert len(sdpa_calls) == 2
    assert all(c.get("attn_mask") is None and c["is_causal"] for c in sdpa_calls)
    sdpa_calls.clear()
    bert = BERT(ModelConfig(family="bert", norm_position="post", **SMALL), world1)
    bert(tokens, padding_mask=torch.ones(2, 24, dtype=torch.bool))
    assert len(sdpa_calls) == 2
    assert all(c.get("attn_mask") is None and not c.get("is_causal") for c in sdpa_calls)
    sdpa_calls.clear()
    padded = torch.ones(2, 24, dtype=torch.bool)
    padded[1, 20:] = False
    bert(tokens, padding_mask=padded)
    assert all(c.get("attn_mask") is not None for c in sdpa_calls)


def reach(model, t: int, changed: int) -> float:
    """How much the output at position t moves when the token at `changed` changes."""
    torch.manual_seed(3)
    x = torch.randint(0, 64, (1, 24))
    y = x.clone()
    y[0, changed] = (y[0, changed] + 1) % 64
    with torch.no_grad():
        return (model(x)[0, t] - model(y)[0, t]).abs().max().item()


def test_gpt_window_layers(world1):
    """Two layers with window 4: position 20 sees back to 20 - 2 * 3 = 14, not 13. With only
    layer 0 windowed, layer 1 sees everything, so position 13 reaches it."""
    cfg = ModelConfig(attention="sliding_window", attention_window=4, **SMALL)
    both = GPT(cfg, world1)
    assert [b.attn.window for b in both.blocks] == [4, 4]
    assert reach(both, 20, 13) == 0.0
    assert reach(both, 20, 14) > 1e-6
    first = GPT(dataclasses.replace(cfg, window_layers=[0]), world1)
    assert [b.attn.window for b in first.blocks] == [4, None]
    assert reach(first, 20, 2) > 1e-6


def test_bert_longformer_globals(world1):
    """Longformer BERT, one layer, window 3: position 20 sees 18..22 and the global position 0;
    position 0 sees everything."""
    cfg = ModelConfig(
        family="bert",
        norm_position="post",
        attention="longformer",
        attention_window=3,
        **{**SMALL, "n_layers": 1},
    )
    bert = BERT(cfg, world1)
    assert reach(bert, 20, 17) == 0.0 and reach(bert, 20, 23) == 0.0
    assert reach(bert, 20, 18) > 1e-6 and reach(bert, 20, 0) > 1e-6
    assert reach(bert, 0, 23) > 1e-6


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(attention="longformer"), "model.attention"),
        (dict(attention="sliding_window", attention_window=0), "model.attention_window"),
        (dict(attention="sliding_window", window_layers=[2]), "model.window_layers"),
        (dict(window_layers=[0]), "model.window_layers"),
    ],
)
def test_attention_config_errors(changes, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**SMALL, **changes).validate()


def test_benchmark_quick_mode_runs(world1, tmp_path):
    """benchmarks/attention.py stays runnable (tiny sizes; its numbers are not checked)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "attention.py"
    spec = importlib.util.spec_from_file_location("attention_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    text = bench.main(["--quick", "--plot", str(tmp_path / "plot.png")])
    assert (tmp_path / "plot.png").stat().st_size > 0
    for row in ("| dense-mask |", "| causal |", "| window |", "| longformer |", "| cached |"):
        assert row in text


def test_pipeline_blocks_get_the_layer_windows(world1):
    """Pipeline stages build their blocks one layer at a time: each gets its layer's window,
    and BERT's stage blocks pass the global positions."""
    from pretrain.models.layers import TensorParallel
    from pretrain.models.pipeline import BERTBlock, GPTBlock

    tpc = TensorParallel.build(world1)
    cfg = ModelConfig(attention="sliding_window", attention_window=4, window_layers=[1], **SMALL)
    assert [GPTBlock(cfg, tpc, 0, i).block.attn.window for i in range(2)] == [None, 4]
    bert = ModelConfig(family="bert", attention="longformer", attention_window=3, **SMALL)
    block = BERTBlock(bert, tpc, 0, 0)
    assert block.block.attn.window == 3 and block.global_positions == (0,)
