"""Learning-rate schedules and AdamW parameter groups."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pretrain.config import ModelConfig, OptimConfig
from pretrain.models.gpt import GPT
from pretrain.optim import build_scheduler, lr_lambda, param_groups

BASE = ModelConfig(n_layers=2, d_model=32, n_heads=4, seq_len=16, vocab_size=96)

OPT = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)


def test_warmup_is_linear_to_the_peak():
    f = lr_lambda(OPT, train_steps=100)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == pytest.approx(1.0)


def test_cosine_decays_to_min_lr_at_decay_end():
    f = lr_lambda(OPT, train_steps=100)
    floor = OPT.min_lr / OPT.lr
    mid = 10 + (100 - 10) // 2
    assert f(mid) == pytest.approx(floor + (1 - floor) * 0.5, rel=1e-6)  # halfway: cos = 0
    assert f(100) == pytest.approx(floor)
    assert f(500) == pytest.approx(floor)  # stays at the floor after the decay
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone


def test_decay_steps_overrides_the_run_length():
    f = lr_lambda(dataclasses.replace(OPT, decay_steps=50), train_steps=100)
    assert f(50) == pytest.approx(OPT.min_lr / OPT.lr)


def test_inverse_sqrt_matches_the_transformer_schedule():
    cfg = dataclasses.replace(OPT, schedule="inverse_sqrt")
    f = lr_lambda(cfg, train_steps=1000)
    # Vaswani et al.: lr ~ min(step / warmup, sqrt(warmup / step)), continuous at the peak.
    for step in (10, 40, 90, 999):
        assert f(step) == pytest.approx(math.sqrt(10 / (step + 1)))
    assert f(9) == pytest.approx(1.0)
    assert f(39) == pytest.approx(0.5)  # four times the warmup: half the peak


def test_constant_after_warmup():
    f = lr_lambda(dataclasses.replace(OPT, schedule="constant"), train_steps=100)
    assert f(0) == pytest.approx(0.1) and f(10) == f(99) == 1.0


def test_scheduler_factory_drives_the_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=OPT.lr)
    sched = build_scheduler(OPT, train_steps=100)(opt)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(OPT.lr * 0.1) and seen[10] == pytest.approx(OPT.lr)
    assert seen[11] < seen[10]  # the cosine decay has begun


def test_param_groups_decay_only_matrices(world1):
    model = GPT(BASE, world1)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert decayed | undecayed == set(names.values()) and not decayed & undecayed
    assert all(n.endswith("weight") and "ln" not in n for n in decayed)
    assert "pos_embed.weight" in undecayed
    assert any("bias" in n for n in undecayed) and any("ln_" in n for n in undecayed)
    assert "embed.weight" in decayed


def test_t5_position_bias_tables_are_not_decayed(world1):
    from pretrain.config import load_config, resolve_vocab
    from pretrain.models import build_model

    cfg = resolve_vocab(load_config("configs/tiny_t5.yaml"), 300).model
    model = build_model(cfg, world1)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    tables = {n for n in names.values() if n.startswith(("enc_bias.", "dec_bias."))}
    assert tables and tables <= undecayed  # 2-D, yet position tables, not linear maps
    assert any(names[id(p)].startswith("encoder") for p in decay["params"])
