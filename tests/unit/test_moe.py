"""Mixture of experts (pretrain.models.moe) in one process: routing with a hand-set router,
capacity and dropping by the formula, the balancing and z-losses against hand-computed values,
their token-weighted entry into the loss, independent expert init whatever the expert-parallel
layout, the statistics, and the config refusals. Multi-process checks (expert parallel 2 against
1, exact resume) are in tests/distributed/test_moe_parallel.py."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pretrain.config import Config, ConfigError, ModelConfig

D, E = 8, 4
BASE = ModelConfig(
    n_layers=2,
    d_model=D,
    n_heads=2,
    seq_len=8,
    vocab_size=64,
    moe_experts=E,
    moe_every=1,
    moe_min_capacity=0,
    moe_random_token_selection=False,
)


def ffn(**changes):
    from pretrain.models.moe import MoEFeedForward

    torch.manual_seed(0)
    return MoEFeedForward(dataclasses.replace(BASE, **changes), n_layers=2)


def routed_inputs(experts: list[int], margin: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [T, 1, D] and a router weight [E, D] under which token t's logits are `margin` for
    expert experts[t] and 0 elsewhere: x_t is the unit vector of dimension experts[t] and the
    router maps dimension e to expert e."""
    x = torch.zeros(len(experts), 1, D)
    for t, e in enumerate(experts):
        x[t, 0, e] = 1.0
    wg = torch.zeros(E, D)
    wg[:, :E] = margin * torch.eye(E)
    return x, wg


def expected_output(layer, x_TD: torch.Tensor, expert_T: list[int], kept: list[bool]):
    """What a top-1 layer must output: gate probability times the chosen expert's MLP for a
    kept token, zero for a dropped one (the block's residual then passes it on)."""
    probs = torch.softmax(x_TD @ layer.router.wg.weight.T, dim=-1)
    rows = []
    for t, (e, keep) in enumerate(zip(expert_T, kept, strict=True)):
        y = probs[t, e] * layer.local_experts[e](x_TD[t]) if keep else torch.zeros(D)
        rows.append(y)
    return torch.stack(rows)


def test_tokens_go_to_their_argmax_expert(world1):
    experts = [2, 0, 3, 1, 2, 0]
    layer = ffn(moe_capacity_factor=4.0)  # room for every token
    x, wg = routed_inputs(experts)
    with torch.no_grad():
        layer.router.wg.weight.copy_(wg)
        out = layer(x)[:, 0]
    want = expected_output(layer, x[:, 0], experts, [True] * len(experts))
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7)
    assert layer.router.read_statistics()["dropped"] == 0.0
    # Negative control: another routing of the same tokens gives another output.
    wrong = expected_output(layer, x[:, 0], [(e + 1) % E for e in experts], [True] * 6)
    assert not torch.allclose(out, wrong, atol=1e-4)


def capacity(tokens: int, factor: float, min_capacity: int = 0) -> int:
    """Switch's expert capacity: ceil(tokens / experts * factor), at least min_capacity."""
    return max(math.ceil(tokens / E * factor), min_capacity)


@pytest.mark.parametrize("training", [True, False])
def test_tokens_beyond_capacity_are_dropped(world1, training):
    """12 tokens, 9 of them to expert 1: capacity ceil(12/4 * 1.0) = 3 in training (factor
    1.0) and ceil(12/4 * 2.0) = 6 in evaluation (factor 2.0). Exactly capacity of expert 1's
    tokens are processed, the others output zero; the other experts keep all theirs."""
    experts = [1, 1, 0, 1, 1, 1, 2, 1, 1, 3, 1, 1]
    layer = ffn(moe_capacity_factor=1.0, moe_eval_capacity_factor=2.0)
    layer.train(training)
    cap = capacity(len(experts), 1.0 if training else 2.0)
    assert cap == (3 if training else 6)
    x, wg = routed_inputs(experts)
    with torch.no_grad():
        layer.router.wg.weight.copy_(wg)
        out = layer(x)[:, 0]
    full = expected_output(layer, x[:, 0], experts, [True] * len(experts))
    kept = [
        bool(torch.allclose(o, f, rtol=1e-6, atol=1e-7)) for o, f in zip(out, full, strict=True)
    ]
    dropped = [bool(torch.all(o == 0)) for o in out]
    assert all(
        k != d for k, d in zip(kept, dropped, strict=True)
    )  # each token: its expert's output, or 0
    assert sum(k for k, e in zip(kept, experts, strict=True) if e == 1) == cap
    assert all(k for k, e in zip(kept, experts, strict=True) if e != 1)
    if training:  # statistics are of training forwards
        stats = layer.router.read_statistics()
        assert stats["dropped"] == pytest.approx((9 - cap) / 12)
        assert stats["load"] == pytest.approx([1 / 12, cap / 12, 1 / 12, 1 / 12])
        assert stats["routed"] == pytest.approx([1 / 12, 9 / 12, 1 / 12, 1 / 12])


def test_no_token_dropped_when_capacity_makes_room(world1):
    """Factor 3.0: capacity ceil(12/4 * 3) = 9 holds all 9 tokens of the busiest expert; and
    drop_tokens=false grows the capacity to the busiest expert at factor 1.0."""
    experts = [1, 1, 0, 1, 1, 1, 2, 1, 1, 3, 1, 1]
    x, wg = routed_inputs(experts)
    for changes in (dict(moe_capacity_factor=3.0), dict(moe_drop_tokens=False)):
        layer = ffn(**changes)
        with torch.no_grad():
            layer.router.wg.weight.copy_(wg)
            out = layer(x)[:, 0]
        want = expected_output(layer, x[:, 0], experts, [True] * len(experts))
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7)


def gate_with_logits(logits_TE: torch.Tensor, **changes):
    """A Router whose logits for the returned tokens are exactly logits_TE (identity inputs)."""
    from pretrain.models.moe import Router

    t, n = logits_TE.shape
    router = Router(dataclasses.replace(BASE, d_model=t, moe_experts=n, **changes))
    with torch.no_grad():
        router.wg.weight.copy_(logits_TE.T)
    return router, torch.eye(t)


def test_balancing_loss_on_a_hand_made_batch(world1):
    """probs rows (0.9,0.1), (0.8,0.2), (0.7,0.3), (0.4,0.6): top experts 0,0,0,1 so
    f = (3/4, 1/4); mean probabilities P = (0.7, 0.3); N * sum f_i P_i = 2 * (0.525 + 0.075)
    = 1.2. Both DeepSpeed's l_aux (what training uses) and our reference give it."""
    from pretrain.models.moe import balancing_loss

    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
    router, x = gate_with_logits(probs.log(), moe_capacity_factor=4.0)
    router(x, sparse_routes=True)
    assert router.aux_loss.item() == pytest.approx(1.2, rel=1e-6)
    assert balancing_loss(probs, probs.argmax(-1)).item() == pytest.approx(1.2, rel=1e-6)


def test_balancing_loss_is_one_at_perfect_balance(world1):
    probs = torch.tensor([[0.6, 0.4], [0.4, 0.6], [0.7, 0.3], [0.3, 0.7]])
    router, x = gate_with_logits(probs.log(), moe_capacity_factor=4.0)
    router(x, sparse_routes=True)
    assert router.aux_loss.item() == pytest.approx(1.0, rel=1e-6)


def test_z_loss_is_mean_squared_logsumexp(world1):
    """logits (0, 0) and (ln 3, 0): logsumexp ln 2 and ln 4, so z = (ln^2 2 + 4 ln^2 2) / 2."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    router, x = gate_with_logits(logits)
    router(x, sparse_routes=True)
    assert router.z_loss.item() == pytest.approx(2.5 * math.log(2.0) ** 2, rel=1e-6)


def gpt(world1, seed: int = 7, ep_size: int = 1, ep_rank: int = 0, **changes):
    from pretrain.models import build_model

    torch.manual_seed(seed)
    return build_model(dataclasses.replace(BASE, **changes), world1, 1, False, ep_size, ep_rank)


def test_router_losses_enter_the_loss_token_weighted(world1):
    """loss = LM + scale * sum over layers (0.01 * balancing + 0.001 * z), scale = routed
    tokens / loss_tokens (1 without loss_tokens); nothing is added in evaluation."""
    from pretrain.models.moe import routers

    weights = dict(moe_aux_loss_weight=0.01, moe_z_loss_weight=0.001, moe_capacity_factor=4.0)
    model = gpt(world1, **weights)
    tokens = torch.randint(0, 64, (2, 8))
    plain = gpt(world1, moe_aux_loss_weight=0.0, moe_z_loss_weight=0.0, moe_capacity_factor=4.0)
    with torch.no_grad():
        lm = plain(tokens, tokens).item()
        total = model(tokens, tokens).item()
        extra = sum(0.01 * r.aux_loss.item() + 0.001 * r.z_loss.item() for r in routers(model))
        assert total == pytest.approx(lm + extra, rel=1e-6)
        assert extra > 0.02  # two layers, balancing >= 1 each: the check is not vacuous
        # loss_tokens = half the routed tokens: the LM term doubles, so do the router terms.
        half = torch.tensor(8.0)
        assert model(tokens, tokens, loss_tokens=half).item() == pytest.approx(
            2 * lm + 2 * extra, rel=1e-6
        )
        model.eval()
        assert model(tokens, tokens).item() == pytest.approx(lm, rel=1e-6)


def expert_tensors(model) -> list[torch.Tensor]:
    from pretrain.models.moe import MoEFeedForward

    return [
        torch.cat([p.flatten() for p in expert.parameters()])
        for m in model.modules()
        if isinstance(m, MoEFeedForward)
        for expert in m.local_experts
    ]


def test_experts_start_independent_and_layout_free(world1):
    """Every expert differs from every other (DeepSpeed alone would deep-copy one), and the
    experts a rank holds at ep=2 are exactly the global ones the ep=1 model holds there."""
    whole = expert_tensors(gpt(world1))  # 2 layers x 4 experts
    assert len(whole) == 2 * E
    for i in range(len(whole)):
        for j in range(i + 1, len(whole)):
            assert not torch.equal(whole[i], whole[j]), (i, j)
    for rank in (0, 1):
        local = expert_tensors(gpt(world1, ep_size=2, ep_rank=rank))
        want = [whole[layer * E + rank * 2 + j] for layer in range(2) for j in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(local, want, strict=True))
    # Another model seed gives other experts.
    assert not torch.equal(expert_tensors(gpt(world1, seed=8))[0], whole[0])


def test_statistics_sum_to_one_and_reset(world1):
    from pretrain.models.moe import console_summary, moe_statistics

    model = gpt(world1, moe_capacity_factor=1.0)
    tokens = torch.randint(0, 64, (2, 8))
    assert moe_statistics(model) == {}
    model(tokens, tokens).backward()
    stats = moe_statistics(model)
    for layer in (0, 1):
        loads = [stats[f"moe/{layer}/load_{e}"] for e in range(E)]
        assert sum(loads) + stats[f"moe/{layer}/dropped"] == pytest.approx(1.0)
        routed = [stats[f"moe/{layer}/routed_{e}"] for e in range(E)]
        assert sum(routed) == pytest.approx(1.0)
        assert stats[f"moe/{layer}/max_load_ratio"] == pytest.approx(E * max(routed))
        assert 0 < stats[f"moe/{layer}/entropy"] <= math.log(E) + 1e-6
    assert "max load" in console_summary(stats)
    assert moe_statistics(model) == {}  # read since the last call: nothing new


def moe_config(**parallel) -> Config:
    cfg = Config(model=dataclasses.replace(BASE, moe_min_capacity=4))
    cfg.parallel = dataclasses.replace(cfg.parallel, **parallel)
    return cfg


@pytest.mark.parametrize(
    "parallel, field",
    [
        (dict(pp=2), "parallel.pp"),
        (dict(zero_stage=3), "parallel.zero_stage"),
        (dict(ep=3), "parallel.ep"),
    ],
)
def test_unsupported_layouts_are_refused_by_the_config(parallel, field):
    with pytest.raises(ConfigError) as e:
        moe_config(**parallel).validate()
    assert e.value.field_name == field


def test_ep_must_divide_dp_before_any_group(group_starts):
    cfg = moe_config(ep=2).validate()
    assert cfg.parallel.layout(4)[0] == 4
    with pytest.raises(ConfigError, match="parallel.ep"):
        cfg.parallel.layout(3)
    assert group_starts == []


def test_param_count_matches_built_moe_model(world1):
    from pretrain.models.flops import active_param_count, param_count

    model = gpt(world1, moe_every=2)
    cfg = model.cfg
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())
    expert = expert_tensors(model)[0].numel()
    # Active: the dense count with one expert per MoE layer, plus the router.
    assert active_param_count(cfg) == param_count(cfg) - (E - 1) * expert


def router_trained_on(aux_weight: float, steps: int = 30) -> float:
    """Busiest expert's load over the mean after `steps` Adam steps on the router alone, from a
    collapsed start (every token's top expert is 0), with loss = aux_weight * balancing. The
    full-model check (tiny Switch GPT, 200 steps, with and without the loss) is
    benchmarks/moe.py."""
    from pretrain.models.moe import moe_statistics

    layer = ffn(moe_drop_tokens=False)
    g = torch.Generator().manual_seed(0)
    u = torch.zeros(D)
    u[0] = 1.0
    x = torch.randn(64, 1, D, generator=g) + 3.0 * u
    with torch.no_grad():
        layer.router.wg.weight.zero_()
        layer.router.wg.weight[0] = 2.0 * u
    opt = torch.optim.Adam([layer.router.wg.weight], lr=0.1)
    for _ in range(steps):
        layer(x)
        opt.zero_grad()
        (aux_weight * layer.router.aux_loss).backward()
        opt.step()
    moe_statistics(layer)
    with torch.no_grad():
        layer(x)
    return moe_statistics(layer)["moe/0/max_load_ratio"]


def test_balancing_loss_spreads_a_collapsed_router(world1):
    assert router_trained_on(0.0) == pytest.approx(E)  # control: all tokens stay on expert 0
    assert router_trained_on(1.0) < 2.0


def test_top2_combines_two_experts_by_normalised_gates(world1):
    """Top-2 with room for every token: output = (p1 E1(x) + p2 E2(x)) / (p1 + p2). Logit gaps
    of 20 keep DeepSpeed's sampled second choice (Gumbel noise) on the second-largest logit."""
    first, second = [0, 1, 2, 3, 0, 2], [1, 2, 3, 0, 3, 1]
    layer = ffn(moe_top_k=2, moe_capacity_factor=4.0)
    x = torch.zeros(len(first), 1, D)
    for t, (a, b) in enumerate(zip(first, second, strict=True)):
        x[t, 0, a], x[t, 0, b] = 2.0, 1.0
    with torch.no_grad():
        layer.router.wg.weight.zero_()
        layer.router.wg.weight[:, :E] = 20.0 * torch.eye(E)
        out = layer(x)[:, 0]
        probs = torch.softmax(x[:, 0] @ layer.router.wg.weight.T, dim=-1)
        experts = layer.local_experts
        want = torch.stack(
            [
                (probs[t, a] * experts[a](x[t, 0]) + probs[t, b] * experts[b](x[t, 0]))
                / (probs[t, a] + probs[t, b])
                for t, (a, b) in enumerate(zip(first, second, strict=True))
            ]
        )
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    stats = layer.router.read_statistics()
    assert stats["dropped"] == 0.0
    assert stats["load"] == pytest.approx([3 / 12, 3 / 12, 3 / 12, 3 / 12])


def test_flops_count_the_router_and_top_k_experts():
    """Per token, top-1 adds only the router (6 * d_model * experts per MoE layer) to the
    dense model's FLOPs; top-2 adds one more expert MLP (6 * 2 * d_model * ffn)."""
    from pretrain.models.flops import flops_per_token

    cfg = dataclasses.replace(BASE, moe_every=2)  # one MoE layer of two
    dense = flops_per_token(dataclasses.replace(cfg, moe_experts=0))
    assert flops_per_token(cfg) - dense == 6 * D * E
    top2 = dataclasses.replace(cfg, moe_top_k=2)
    assert flops_per_token(top2) - dense == 6 * D * E + 6 * 2 * D * cfg.ffn_size
