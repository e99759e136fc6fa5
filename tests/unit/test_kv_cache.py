"""Generation with a KV cache (pretrain.generate, attention.KVCache): the same greedy tokens
and logits as recomputing the whole context per token, for GPT (also with a sliding window on
some layers, grouped-query attention and rotary positions) and T5's decoder."""

from __future__ import annotations

import pytest
import torch

from pretrain import generate as G
from pretrain.config import ModelConfig
from pretrain.models.gpt import GPT
from pretrain.models.t5 import T5

V = 64
# init_std 0.2: peaked logits, so the greedy tokens depend on the attention actually done.
GPT_CASES = {
    "learned": dict(),
    "rope-gqa-window": dict(
        positions="rope",
        n_kv_heads=2,
        attention="sliding_window",
        attention_window=5,
        window_layers=[0, 2],
    ),
    "sinusoidal-window": dict(
        positions="sinusoidal", attention="sliding_window", attention_window=3
    ),
}


def gpt(world1, **changes) -> GPT:
    cfg = ModelConfig(
        n_layers=3, d_model=32, n_heads=4, seq_len=20, vocab_size=V, init_std=0.2, **changes
    )
    torch.manual_seed(0)
    return GPT(cfg, world1).eval()


def stepwise_logits(model, ids: list[int]) -> torch.Tensor:
    """Each position's logits through the cache: the first 3 tokens at once, then one by one."""
    caches = G.new_caches(model.blocks)
    with torch.no_grad():
        out = [G.gpt_step(model, torch.tensor([ids[:3]]), caches)[0]]
        out += [G.gpt_step(model, torch.tensor([[t]]), caches)[0] for t in ids[3:]]
    return torch.cat(out)


@pytest.mark.parametrize("case", list(GPT_CASES))
def test_gpt_cached_generation_equals_uncached(world1, case, monkeypatch):
    model = gpt(world1, **GPT_CASES[case])
    kw = dict(seq_len=12, vocab_limit=V)
    # 14 new tokens from a prompt of 4: past seq_len=12 the context slides, and the cached
    # path refills.
    want = G.generate(model, [1, 2, 3, 4], 14, kv_cache=False, **kw)
    calls = []
    real = G.gpt_step
    monkeypatch.setattr(G, "gpt_step", lambda *a: calls.append(a[1].shape[1]) or real(*a))
    got = G.generate(model, [1, 2, 3, 4], 14, **kw)
    assert got == want
    assert len(set(want)) >= 3  # not a constant stream, which any path would reproduce
    # The cache was used: one-token steps up to seq_len, then refills of the whole context.
    assert calls[:3] == [4, 1, 1] and calls.count(1) == 12 - 4 and calls[-1] == 12


@pytest.mark.parametrize("case", list(GPT_CASES))
def test_gpt_cached_logits_match_the_full_forward(world1, case):
    model = gpt(world1, **GPT_CASES[case])
    ids = torch.randint(0, V, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0]
    assert (stepwise_logits(model, ids) - full).abs().max() < 1e-5


def test_window_ignored_by_the_cache_is_caught(world1):
    """Negative control: the same cached steps without the window (a cache that keeps every key)
    give other logits than the windowed model's full forward."""
    model = gpt(world1, **GPT_CASES["sinusoidal-window"])
    ids = torch.randint(0, V, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0]
    for block in model.blocks:
        block.attn.window = None
    assert (stepwise_logits(model, ids) - full)[3:].abs().max() > 1e-3


def t5(world1) -> T5:
    cfg = ModelConfig(
        family="t5",
        positions="relative",
        n_layers=2,
        d_model=32,
        n_heads=4,
        seq_len=24,
        vocab_size=V,
        n_kv_heads=2,
        init_std=0.2,
    )
    torch.manual_seed(0)
    return T5(cfg, world1).eval()


def t5_stepwise(model, enc: list[int], dec: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        memory = model.encode(torch.tensor([enc]))
        caches = G.new_caches(model.decoder)
        n = dec.shape[1]
        return torch.cat([G.t5_step(model, dec[:, i : i + 1], memory, caches)[0] for i in range(n)])


def test_t5_cached_decoding_equals_uncached(world1, monkeypatch):
    model = t5(world1)
    g = torch.Generator().manual_seed(2)
    enc = torch.randint(1, V, (12,), generator=g).tolist()
    kw = dict(start_id=0, vocab_limit=V)
    # (A random T5 repeats one token: the logits below are the stronger check.)
    want = G.generate_seq2seq(model, enc, 6, kv_cache=False, **kw)
    assert G.generate_seq2seq(model, enc, 6, **kw) == want
    # Step by step the logits are the full decode's, for a varied decoder input.
    dec = torch.cat(
        [torch.zeros(1, 1, dtype=torch.long), torch.randint(1, V, (1, 14), generator=g)], 1
    )
    with torch.no_grad():
        full = model.decode(dec, model.encode(torch.tensor([enc])))[0]
    assert (t5_stepwise(model, enc, dec) - full).abs().max() < 1e-5
    # Negative control: the relative position bias of query 0 for every step (the query's
    # offset ignored) changes them.
    bias = model.dec_bias.forward
    monkeypatch.setattr(model.dec_bias, "forward", lambda q, k, q_offset=0: bias(q, k))
    assert (t5_stepwise(model, enc, dec) - full).abs().max() > 1e-3
