"""Scaling-law fits recover the laws that generated their data: losses from the published
Chinchilla fit (Hoffmann et al. 2022: E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28) on an
IsoFLOP grid of 8 sizes x 6 compute budgets, and on a much wider IsoFLOP grid (the only kind on
which A and B are recovered within 5% at 1% noise), with 1% noise."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.scaling import fits
from pretrain.scaling.fits import Observation

TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
SIZES = np.logspace(7, 10.5, 8)  # 10M to 32B parameters
BUDGETS = np.logspace(18, 22, 6)  # 1e18 to 1e22 FLOPs


def chinchilla_grid(noise: float, seed: int = 0, law: dict | None = None) -> list[Observation]:
    p = law or TRUE
    rng = np.random.default_rng(seed)
    obs = []
    for c in BUDGETS:
        for n in SIZES:
            d = c / (6 * n)  # C = 6ND, as the closed-form optimum assumes
            loss = p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]
            obs.append(
                Observation(
                    f"{n:.2g}@{c:.2g}", n, d, c, loss * (1 + noise * rng.standard_normal()), c
                )
            )
    return obs


def rel_err(fit: fits.Chinchilla, law: dict) -> dict[str, float]:
    return {k: abs(v / law[k] - 1) for k, v in fit.params().items()}


def test_approach3_recovers_every_parameter_at_low_noise():
    """0.1% noise: all five parameters within 5%."""
    err = rel_err(fits.approach3(chinchilla_grid(0.001)), TRUE)
    assert max(err.values()) < 0.05, err


def test_approach3_at_one_percent_noise():
    """1% noise: E, alpha, beta and N_opt's exponent within 5%; A and B are set by the
    exponents (an error of 0.01 in alpha moves A by ~20% at N ~ 1e9), so they are checked
    against their bootstrap intervals, which must contain the truth."""
    obs = chinchilla_grid(0.01)
    fit = fits.approach3(obs)
    err = rel_err(fit, TRUE)
    assert err["E"] < 0.05 and err["alpha"] < 0.05 and err["beta"] < 0.05, err
    assert abs(fit.a - 0.28 / 0.62) < 0.03
    ci = fits.bootstrap(obs, fit, samples=40, seed=1, budget_C=1e21)
    for k, v in TRUE.items():
        assert ci[k][0] <= v <= ci[k][1], (k, ci[k])
    n_opt, d_opt = fit.optimal(1e21)
    assert ci["N_opt (approach 3)"][0] <= n_opt <= ci["N_opt (approach 3)"][1]
    assert n_opt * d_opt * 6 == pytest.approx(1e21)


SEEDS = range(10)


def wide_isoflop_grid(noise: float, seed: int, flops_per_param_token: float = 6.0):
    """13 IsoFLOP budgets 1e12..1e24 FLOPs, 13 sizes per budget from 1/30 to 30x its
    compute-optimal N (5e3 to 1.3e12 parameters, 3e4 to 1.3e14 tokens). The losses come from
    D = C / 6N; `flops_per_param_token` is the count the observations' D is computed with."""
    t = TRUE
    g = (t["alpha"] * t["A"] / (t["beta"] * t["B"])) ** (1 / (t["alpha"] + t["beta"]))
    rng = np.random.default_rng(seed)
    obs = []
    for c in np.logspace(12, 24, 13):
        n_opt = g * (c / 6) ** (t["beta"] / (t["alpha"] + t["beta"]))
        for n in n_opt * np.logspace(-1.5, 1.5, 13):
            loss = t["E"] + t["A"] / n ** t["alpha"] + t["B"] / (c / (6 * n)) ** t["beta"]
            d = c / (flops_per_param_token * n)
            obs.append(Observation("", n, d, c, loss * (1 + noise * rng.standard_normal()), c))
    return obs


def recovered_on_every_seed(flops_per_param_token: float = 6.0) -> dict[int, dict]:
    """The seeds whose 1%-noise fit misses some parameter by 5% or more, with their errors."""
    misses = {}
    for seed in SEEDS:
        fit = fits.approach3(wide_isoflop_grid(0.01, seed, flops_per_param_token))
        err = rel_err(fit, TRUE)
        if max(err.values()) >= 0.05:
            misses[seed] = err
    return misses


def test_approach3_recovers_every_parameter_at_one_percent_noise_on_a_wide_grid():
    """The issue's bar, every parameter within 5% at 1% noise, on each of 10 noise draws. It
    needs a grid far wider than Chinchilla's 70M..16B: A and B are the power laws' values at
    N = 1 and D = 1, extrapolated ~20 e-folds from the data, so on Chinchilla's range even the
    Cramer-Rao bound on A is ~30% (benchmarks/scaling_fit_recovery.py, docs/scaling-laws.md)."""
    misses = recovered_on_every_seed()
    assert not misses, misses


def test_wide_grid_bar_catches_a_wrong_flops_count():
    """Negative control: the same grid with D computed from C = 8ND while the losses follow
    C = 6ND (a FLOPs count with a wrong constant) misses the bar: B absorbs (6/8)^beta."""
    assert len(recovered_on_every_seed(flops_per_param_token=8.0)) >= 5


def test_approach3_follows_the_data_not_the_published_values():
    """Negative control: data from another law are fitted to that law (a fit stuck at, or
    started from, Chinchilla's values would fail here)."""
    other = {"E": 2.5, "A": 120.0, "B": 900.0, "alpha": 0.25, "beta": 0.36}
    err = rel_err(fits.approach3(chinchilla_grid(0.001, law=other)), other)
    assert max(err.values()) < 0.05, err


def test_approach2_recovers_the_exponent_of_n_opt():
    """N_opt ~ C^a with a = beta / (alpha + beta) = 0.4516 under C = 6ND; D_opt ~ C^(1-a)."""
    fit = fits.approach2(chinchilla_grid(0.01))
    assert len(fit.minima) == len(BUDGETS)
    assert abs(fit.a - 0.28 / 0.62) < 0.03
    assert abs(fit.b - 0.34 / 0.62) < 0.03


def test_approach2_needs_isoflop_profiles():
    token_budgets = [Observation(o.point, o.N, o.D, o.C, o.loss, None) for o in chinchilla_grid(0)]
    assert fits.approach2(token_budgets) is None


def test_kaplan_power_law_exact():
    n = np.array([1e6, 1e7, 1e8, 1e9])
    law = fits.fit_power_law(n, (8.8e13 / n) ** 0.076)  # Kaplan et al.'s L(N)
    assert law.alpha == pytest.approx(0.076) and law.x_c == pytest.approx(8.8e13, rel=1e-6)


def test_kaplan_uses_each_size_best_run():
    obs = [
        Observation("a", 1e6, 1e8, 0, 4.0),
        Observation("b", 1e6, 1e9, 0, 3.0),  # the longer run of the same size
        Observation("c", 1e7, 1e9, 0, 2.0),
    ]
    laws = fits.kaplan(obs)
    assert laws["L(N)"](1e6) == pytest.approx(3.0) and laws["L(N)"](1e7) == pytest.approx(2.0)
    assert laws["L(D)"](1e8) == pytest.approx(4.0) and laws["L(D)"](1e9) == pytest.approx(2.0)


def test_r_squared_by_hand():
    # mean 2, total sum of squares 2; residuals 0.1, -0.1, 0 -> 0.02 -> R^2 = 0.99
    assert fits.r_squared([1.0, 2.0, 3.0], [1.1, 1.9, 3.0]) == pytest.approx(0.99)
