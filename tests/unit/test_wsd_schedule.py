"""Warmup-stable-decay: values computed by hand, and the property sweeps rely on: runs of one
schedule agree up to the shorter run's cooldown start."""

from __future__ import annotations

import dataclasses

import pytest

from pretrain.config import ConfigError, OptimConfig, from_dict
from pretrain.optim import lr_lambda, wsd_cooldown_start

# Peak 1e-3, floor 1e-4 (multiplier 0.1), 10 warmup steps; 100 steps cool down over the last 20.
WSD = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="wsd", cooldown_fraction=0.2)


def test_wsd_linear_values():
    f = lr_lambda(dataclasses.replace(WSD, cooldown_shape="linear"), train_steps=100)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5)  # warmup (step+1)/10
    assert f(10) == f(50) == f(80) == 1.0  # stable through the cooldown start, step 80
    assert f(85) == pytest.approx(0.1 + 0.9 * 0.75)  # a quarter of the way down
    assert f(90) == pytest.approx(0.55)
    assert f(99) == pytest.approx(0.1 + 0.9 * 0.05)
    assert f(100) == pytest.approx(0.1)


def test_wsd_one_minus_sqrt_values():
    f = lr_lambda(dataclasses.replace(WSD, cooldown_fraction=0.25), train_steps=100)
    assert f(75) == 1.0  # the default shape; cooldown over the last 25 steps
    assert f(84) == pytest.approx(0.1 + 0.9 * (1 - 0.6))  # progress 9/25: sqrt = 0.6
    assert f(91) == pytest.approx(0.1 + 0.9 * (1 - 0.8))  # progress 16/25: sqrt = 0.8
    assert f(100) == pytest.approx(0.1)


def test_cooldown_start_rounds_the_fraction():
    assert wsd_cooldown_start(WSD, 100) == 80
    assert wsd_cooldown_start(WSD, 33) == 26  # 6.6 -> 7 cooldown steps
    assert wsd_cooldown_start(WSD, 2) == 1  # at least one cooldown step


def test_a_shorter_run_is_a_branch_of_a_longer_one():
    """Steps up to the 50-step run's cooldown start (40) use the same rates as the 100-step
    run: a cooldown branched from the long run's checkpoint at step <= 40 is exactly the
    short run. After it they differ."""
    short, long = lr_lambda(WSD, 50), lr_lambda(WSD, 100)
    assert [short(s) for s in range(41)] == [long(s) for s in range(41)]
    assert short(41) < long(41) == 1.0


def test_cosine_is_no_branch_of_a_longer_run():
    """Negative control for the branching property: cosine schedules of different lengths
    differ right after the warmup, so they cannot be branched."""
    cos = dataclasses.replace(WSD, schedule="cosine")
    short, long = lr_lambda(cos, 50), lr_lambda(cos, 100)
    assert short(11) < long(11)


def test_wsd_warmup_must_end_before_the_cooldown():
    with pytest.raises(ConfigError, match="optim.warmup_steps"):
        from_dict(
            {
                "run": {"train_steps": 20},
                "optim": {"schedule": "wsd", "warmup_steps": 17, "cooldown_fraction": 0.2},
            }
        )
    from_dict(
        {
            "run": {"train_steps": 20},
            "optim": {"schedule": "wsd", "warmup_steps": 16, "cooldown_fraction": 0.2},
        }
    )


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_cooldown_fraction_out_of_range(value):
    with pytest.raises(ConfigError, match="optim.cooldown_fraction"):
        from_dict({"optim": {"schedule": "wsd", "cooldown_fraction": value}})


def test_branch_from_needs_resume_auto():
    with pytest.raises(ConfigError, match="run.branch_from"):
        from_dict({"run": {"resume": "never", "branch_from": "runs/a/checkpoints/step_00000010"}})
