"""The GPT model on one process (TP=1 through the same megatron-core layers)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.generate import generate
from pretrain.models.flops import flops_per_token, param_count
from pretrain.models.gpt import GPT
from pretrain.models.layers import Attention, AttentionMask, RotaryEmbedding, TensorParallel

BASE = ModelConfig(n_layers=2, d_model=32, n_heads=4, seq_len=16, vocab_size=96)


def make(world1, **changes) -> GPT:
    torch.manual_seed(0)
    return GPT(dataclasses.replace(BASE, **changes), world1)


def tokens(b=2, s=16, seed=1) -> torch.Tensor:
    return torch.randint(0, BASE.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rope"])
def test_shapes_and_loss(world1, positions):
    model = make(world1, positions=positions)
    x = tokens()
    logits = model(x)
    assert logits.shape == (2, 16, BASE.vocab_size)
    loss = model(x, tokens(seed=2))
    assert loss.shape == ()
    # A fresh model predicts nearly uniformly: loss close to log(V).
    assert abs(loss.item() - math.log(BASE.vocab_size)) < 0.5
    # The loss is the mean token cross-entropy of the full logits.
    ref = F.cross_entropy(logits.reshape(-1, BASE.vocab_size), tokens(seed=2).reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


LLAMA = dict(positions="rope", norm="rmsnorm", activation="swiglu", bias=False, n_kv_heads=2)


@pytest.mark.parametrize(
    "positions, changes",
    [
        ("learned", {}),
        ("sinusoidal", {}),
        ("rope", {}),
        ("rope", LLAMA),
        ("learned", {"norm_position": "post", "n_kv_heads": 1}),
    ],
)
def test_causal(world1, positions, changes):
    """Outputs at position t do not change when tokens after t change; they do change when a
    token at or before t changes (the negative control)."""
    model = make(world1, **{"positions": positions, **changes}).eval()
    x = tokens()
    t = 9
    after = x.clone()
    after[:, t + 1 :] = (after[:, t + 1 :] + 7) % BASE.vocab_size
    before = x.clone()
    before[:, t] = (before[:, t] + 7) % BASE.vocab_size
    with torch.no_grad():
        base, a, b = model(x), model(after), model(before)
    torch.testing.assert_close(a[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
    assert (a[:, t + 1 :] - base[:, t + 1 :]).abs().max() > 1e-3
    assert (b[:, t] - base[:, t]).abs().max() > 1e-3


def naive_attention(attn: Attention, x_BSD: torch.Tensor, causal: bool) -> torch.Tensor:
    """Attention written out: explicit q k^T / sqrt(d), mask, softmax, weighted sum of v."""
    b, s, d = x_BSD.shape
    h, k = attn.heads_local, attn.head_dim
    qkv = x_BSD @ attn.qkv.weight.T + attn.qkv.bias
    qkv = qkv.view(b, s, h, 3, k)
    q, kk, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # [b, h, s, k]
    scores = q @ kk.transpose(-1, -2) / math.sqrt(k)
    if causal:
        mask = torch.ones(s, s, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # [b, h, s, k]
    out = out.transpose(1, 2).reshape(b, s, h * k)
    return out @ attn.proj.weight.T + attn.proj.bias


def test_sdpa_matches_naive_attention(world1):
    torch.manual_seed(0)
    attn = Attention(BASE, TensorParallel.build(world1), n_layers=BASE.n_layers).eval()
    x = torch.randn(3, 16, BASE.d_model)  # the TP=1 stream: [b, s, d]
    with torch.no_grad():
        got = attn(x, AttentionMask(causal=True))
        want = naive_attention(attn, x, causal=True)
        unmasked = naive_attention(attn, x, causal=False)
    assert (got - want).abs().max().item() < 1e-5
    # Negative control: the same comparison fails against attention without the causal mask.
    assert (got - unmasked).abs().max().item() > 1e-3


def test_rotary_depends_on_relative_position_only():
    rope = RotaryEmbedding(head_dim=8, max_len=32, theta=10000.0)
    q, k = torch.randn(8), torch.randn(8)
    # Place q at position m and k at n in an otherwise empty sequence.

    def score(m: int, n: int) -> float:
        seq = torch.zeros(1, 1, 32, 8)
        seq_q, seq_k = seq.clone(), seq.clone()
        seq_q[0, 0, m], seq_k[0, 0, n] = q, k
        return float(rope(seq_q)[0, 0, m] @ rope(seq_k)[0, 0, n])

    assert score(5, 2) == pytest.approx(score(20, 17), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)  # a different offset differs


@pytest.mark.parametrize(
    "changes",
    [{}, {"tie_embeddings": False}, {"positions": "rope"}, {"bias": False}, {"ffn_hidden": 48}],
)
def test_param_count_matches_module(world1, changes):
    cfg = dataclasses.replace(BASE, **changes)
    model = GPT(cfg, world1)
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())
    assert param_count(cfg, embeddings=False) < param_count(cfg)


def test_flops_per_token_formula():
    cfg = dataclasses.replace(
        BASE, vocab_size=50304, n_layers=12, d_model=768, n_heads=12, seq_len=1024
    )
    # GPT-2 small: ~85M non-embedding parameters, 6N + attention ~ 0.85 GFLOP/token.
    assert param_count(cfg, embeddings=False) == pytest.approx(85e6, rel=0.01)
    assert flops_per_token(cfg) == 6 * (12 * 12 * 768**2 + 50304 * 768) + 12 * 12 * 1024 * 768


def test_every_parameter_gets_a_gradient(world1):
    model = make(world1, tie_embeddings=False)
    model(tokens(), tokens(seed=4)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_sequence_longer_than_seq_len_is_rejected(world1):
    with pytest.raises(ValueError, match="seq_len"):
        make(world1)(torch.zeros(1, BASE.seq_len + 1, dtype=torch.long))


def test_generate_greedy_is_deterministic_and_respects_vocab_limit(world1):
    model = make(world1)
    a = generate(model, [1, 2, 3], 10, seq_len=BASE.seq_len, vocab_limit=50)
    b = generate(model, [1, 2, 3], 10, seq_len=BASE.seq_len, vocab_limit=50)
    assert a == b and len(a) == 10 and max(a) < 50
    sampled = generate(
        model, [1, 2, 3], 30, seq_len=BASE.seq_len, vocab_limit=50, temperature=1.0, top_k=5, seed=1
    )
    assert len(sampled) == 30 and max(sampled) < 50
    # Greedy continuation equals the argmax of a full forward pass, step by step.
    with torch.no_grad():
        first = int(model(torch.tensor([[1, 2, 3]]))[0, -1, :50].argmax())
    assert a[0] == first


def test_sequence_parallel_is_a_no_op_at_tp1(world1):
    """build_model ignores sequence_parallel in a group of one (as megatron does): same loss,
    no gradient hooks, no parameter flagged."""
    from pretrain.models import build_model
    from pretrain.models.parallelize import sequence_parallel_params

    torch.manual_seed(0)
    plain = build_model(BASE, world1, 1)
    torch.manual_seed(0)
    sp = build_model(BASE, world1, 1, sequence_parallel=True)
    assert sequence_parallel_params(sp) == []
    x, y = tokens(), tokens(seed=2)
    assert plain(x, y).item() == sp(x, y).item()


def test_state_dict_names_are_stable(world1):
    """Checkpoints of earlier runs keep loading: the GPT-2-style defaults keep their names."""
    names = [k for k in make(world1).state_dict() if not k.endswith("_extra_state")]
    assert names[:3] == ["embed.weight", "pos_embed.weight", "blocks.0.ln_attn.weight"]
    assert "blocks.1.attn.qkv.weight" in names and "blocks.1.mlp.up.weight" in names
    assert names[-2:] == ["ln_f.weight", "ln_f.bias"]


# --- merging tensor-parallel checkpoint shards (pretrain-generate) -----------------------------


class TPRank:
    """A tensor-parallel group of `size` seen from rank `rank`: enough for megatron-core's layers
    to build that rank's shard of every weight (they ask the group its rank and size), never
    enough to run a collective."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def megatron_shards(monkeypatch, cfg: ModelConfig, tp: int) -> list[dict]:
    """Each TP rank's state dict as megatron-core's layers lay it out: the model built from the
    same seed as rank r of a TP group, so megatron splits every weight itself."""
    import torch.distributed as dist

    shards = []
    for r in range(tp):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, r=r: r)
        torch.manual_seed(0)
        shards.append(GPT(cfg, TPRank(r, tp), tp).state_dict())
    monkeypatch.undo()
    return shards


def test_merge_tp_shards_restores_the_full_model(world1, monkeypatch):
    from pretrain.errors import CheckpointError
    from pretrain.generate_cli import merge_tp_shards

    model = make(world1, **LLAMA, tie_embeddings=False)
    full = model.state_dict()
    cfg = dataclasses.replace(BASE, **LLAMA, tie_embeddings=False)
    shards = megatron_shards(monkeypatch, cfg, 2)
    assert (
        shards[0]["blocks.0.attn.qkv.weight"].shape[0] * 2
        == full["blocks.0.attn.qkv.weight"].shape[0]
    )
    merged = merge_tp_shards(shards, full)
    for key, value in full.items():
        if value is not None:
            assert torch.equal(merged[key], value), key
    # Negative control: shards merged in the wrong order load (every shape fits) but are
    # another model, whose output differs.
    swapped = merge_tp_shards(shards[::-1], full)
    t = tokens()
    with torch.no_grad():
        want = model(tokens=t)
        model.load_state_dict(swapped)
        assert not torch.allclose(model(tokens=t), want)
        model.load_state_dict(merged)
        assert torch.equal(model(tokens=t), want)
    # Shards that do not fit the config are refused with the key named.
    bad = [dict(s, **{"blocks.0.mlp.up.weight": s["blocks.0.mlp.up.weight"][:3]}) for s in shards]
    with pytest.raises(CheckpointError, match="blocks.0.mlp.up.weight"):
        merge_tp_shards(bad, full)
