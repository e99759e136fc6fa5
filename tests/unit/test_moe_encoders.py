"""Mixture of experts in BERT's blocks and T5's encoder (pretrain.models.moe, the one MoE MLP of
every family), in one process: the router losses enter the loss at the configured weights (not
scaled by routed over scored tokens, which GPT's token weighting would do here), nothing is
added in evaluation, a few training steps lower the loss and move the router and experts, the
routing statistics appear, and parameter and FLOP counts match the built models."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pretrain.config import ModelConfig

E, S, T_DEC = 4, 8, 4
BASE = ModelConfig(
    n_layers=2,
    d_model=8,
    n_heads=2,
    seq_len=S,
    vocab_size=64,
    moe_experts=E,
    moe_every=1,
    moe_min_capacity=0,
    moe_random_token_selection=False,
    moe_capacity_factor=4.0,  # nothing dropped: the losses compared are the routing's alone
    moe_aux_loss_weight=0.01,
    moe_z_loss_weight=0.001,
)
FAMILIES = ["bert", "t5"]


def build(world1, family: str, seed: int = 7, **changes):
    from pretrain.models import build_model

    cfg = dataclasses.replace(BASE, family=family, **changes)
    torch.manual_seed(seed)
    return build_model(cfg, world1, 1, False)


def batch(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(4, 64, (2, S), generator=g)
    if family == "bert":
        loss_mask = torch.zeros(2, S)
        loss_mask[:, ::3] = 1.0  # 6 of 16 positions scored
        return {"tokens": tokens, "targets": tokens.flip(1), "loss_mask": loss_mask}
    dec = torch.randint(4, 64, (2, T_DEC + 1), generator=g)
    return {"enc_tokens": tokens, "dec_tokens": dec[:, :-1], "targets": dec[:, 1:]}


def routed_and_scored(family: str) -> tuple[int, int]:
    b = batch(family)
    scored = int(b["loss_mask"].sum()) if family == "bert" else b["targets"].numel()
    return 2 * S, scored


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_replace_the_encoder_mlps(world1, family):
    from pretrain.models.moe import MoEFeedForward

    model = build(world1, family)
    encoder = model.encoder if family == "t5" else model.blocks
    assert all(isinstance(block.mlp, MoEFeedForward) for block in encoder)
    if family == "t5":  # the decoder stays dense
        assert not any(isinstance(m, MoEFeedForward) for m in model.decoder.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_router_losses_enter_the_loss_at_the_configured_weights(world1, family):
    """loss = LM + sum over layers (0.01 * balancing + 0.001 * z), whatever loss_tokens is;
    nothing is added in evaluation."""
    from pretrain.models.moe import routers

    model = build(world1, family)
    plain = build(world1, family, moe_aux_loss_weight=0.0, moe_z_loss_weight=0.0)
    b = batch(family)
    routed, scored = routed_and_scored(family)
    share = torch.tensor(scored / 2.0)  # as if the step were split into 2 micro-batches
    with torch.no_grad():
        lm = plain(**b).item()
        total = model(**b).item()
        extra = sum(0.01 * r.aux_loss.item() + 0.001 * r.z_loss.item() for r in routers(model))
        assert extra > 0.02  # two layers, balancing >= 1 each: the check is not vacuous
        assert total == pytest.approx(lm + extra, rel=1e-6)
        lm_share = plain(**b, loss_tokens=share).item()
        assert lm_share == pytest.approx(2 * lm, rel=1e-6)  # the LM term is token-weighted
        with_share = model(**b, loss_tokens=share).item()
        assert with_share == pytest.approx(lm_share + extra, rel=1e-6)
        # GPT's scale (routed / loss_tokens) would have added this instead: distinguishable.
        gpt_scaled = lm_share + routed / share.item() * extra
        assert abs(with_share - gpt_scaled) > 1e-3
        model.eval()
        assert model(**b).item() == pytest.approx(lm, rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_training_steps_move_router_and_experts(world1, family):
    from pretrain.models.moe import MoEFeedForward, moe_statistics, routers

    model = build(world1, family, moe_capacity_factor=1.0)  # and some tokens dropped
    b = batch(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(**b)
        loss.backward()
        if not losses:
            assert all(r.wg.weight.grad.abs().sum() > 0 for r in routers(model))
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".router." in n or ".gate." in n for n in moved)
    assert any("deepspeed_experts" in n for n in moved)
    stats = moe_statistics(model)
    layers = sum(isinstance(m, MoEFeedForward) for m in model.modules())
    assert layers == 2
    for layer in range(layers):
        loads = [stats[f"moe/{layer}/load_{e}"] for e in range(E)]
        assert sum(loads) + stats[f"moe/{layer}/dropped"] == pytest.approx(1.0)
    assert stats["moe/aux_loss"] >= 2.0  # balancing >= 1 per layer


@pytest.mark.parametrize("family", FAMILIES)
def test_param_count_matches_the_built_encoder_moe(world1, family):
    from pretrain.models.flops import active_param_count, param_count
    from pretrain.models.moe import MoEFeedForward

    def built(model) -> int:
        return sum(p.numel() for p in model.parameters())

    model, dense = build(world1, family), build(world1, family, moe_experts=0)
    cfg = model.cfg
    # What the experts add, counted against what they add to the built model (the dense T5
    # count itself is not this test's subject).
    assert param_count(cfg) - param_count(dense.cfg) == built(model) - built(dense)
    ffn = next(m for m in model.modules() if isinstance(m, MoEFeedForward))
    expert = sum(p.numel() for p in ffn.local_experts[0].parameters())
    assert active_param_count(cfg) == param_count(cfg) - 2 * (E - 1) * expert


def test_t5_flops_count_the_encoder_experts():
    """Per token of an example (S encoder + S decoder tokens): the 2 encoder MoE layers add
    6 * (router + (top_k - 1) experts' matmul weights) for each of the S encoder tokens."""
    from pretrain.models.flops import flops_per_token

    dense = dataclasses.replace(BASE, family="t5", moe_experts=0)
    moe = dataclasses.replace(BASE, family="t5")
    d, f = 8, moe.ffn_size
    per_encoder_token = 6 * 2 * (d * E + 0 * 2 * d * f)  # top-1: the router only
    want = per_encoder_token * S // (2 * S)
    assert abs(flops_per_token(moe) - flops_per_token(dense) - want) <= 1
    top2 = dataclasses.replace(moe, moe_top_k=2)
    want2 = 6 * 2 * (d * E + 2 * d * f) * S // (2 * S)
    assert abs(flops_per_token(top2) - flops_per_token(dense) - want2) <= 1
