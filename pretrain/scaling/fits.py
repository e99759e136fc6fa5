"""Scaling-law fits: Kaplan et al. 2020 power laws, Chinchilla (Hoffmann et al. 2022) approaches
2 and 3, with bootstrap confidence intervals.

Approach 3 follows Besiroglu et al. 2024's replication: the Huber loss (delta 1e-3) of
log L(N, D) = LSE(a - alpha log N, b - beta log D, e) against the observed log loss, minimised
by L-BFGS from a grid of starts, A = exp(a), B = exp(b), E = exp(e). Numpy and scipy only: no
torch, no MLflow (tests/unit/test_scaling_fits.py recovers published parameters).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

HUBER_DELTA = 1e-3


@dataclass(frozen=True)
class Observation:
    """One finished run: N parameters, D training tokens, C training FLOPs, final loss; budget
    names the IsoFLOP profile the run belongs to (None for a token budget)."""

    point: str
    N: float
    D: float
    C: float
    loss: float
    budget: float | None = None


# --- Kaplan et al. 2020 ---------------------------------------------------------------------


@dataclass
class PowerLaw:
    """L(x) = (x_c / x) ** alpha, fitted by least squares in log-log space."""

    alpha: float
    x_c: float

    def __call__(self, x):
        return (self.x_c / np.asarray(x, dtype=float)) ** self.alpha


def fit_power_law(x, loss) -> PowerLaw:
    lx, ll = np.log(np.asarray(x, float)), np.log(np.asarray(loss, float))
    slope, intercept = np.polyfit(lx, ll, 1)
    alpha = -slope
    return PowerLaw(alpha=float(alpha), x_c=float(np.exp(intercept / alpha)))


def frontier(keys, loss) -> tuple[np.ndarray, np.ndarray]:
    """The lowest loss at each distinct key (for L(N): every size's best run, which is its
    longest; for L(D): every token count's best, its largest model), keys ascending."""
    best: dict[float, float] = {}
    for k, v in zip(keys, loss, strict=True):
        best[k] = min(v, best.get(k, np.inf))
    ks = np.array(sorted(best))
    return ks, np.array([best[k] for k in ks])


def kaplan(obs: list[Observation]) -> dict[str, PowerLaw | None]:
    """L(N) over each size's best loss and L(D) over each token count's best loss; None where
    fewer than two distinct values exist."""
    out: dict[str, PowerLaw | None] = {}
    for name, key in (("L(N)", "N"), ("L(D)", "D")):
        ks, ls = frontier([getattr(o, key) for o in obs], [o.loss for o in obs])
        out[name] = fit_power_law(ks, ls) if len(ks) >= 2 else None
    return out


# --- Chinchilla approach 3 -----------------------------------------------------------------


@dataclass
class Chinchilla:
    """L(N, D) = E + A / N**alpha + B / D**beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = float("nan")

    def __call__(self, N, D):
        N, D = np.asarray(N, float), np.asarray(D, float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def params(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("E", "A", "B", "alpha", "beta")}

    @property
    def a(self) -> float:
        """N_opt ~ C**a under C = 6ND."""
        return self.beta / (self.alpha + self.beta)

    def optimal(self, C: float, flops_per_param_token: float = 6.0) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L(N, D) subject to C = k N D (k = 6: Kaplan's and
        Chinchilla's closed form)."""
        if self.alpha <= 0 or self.beta <= 0:
            return float("nan"), float("nan")  # no finite optimum: loss falls forever in N or D
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        n = G * (C / flops_per_param_token) ** self.a
        return float(n), float(C / flops_per_param_token / n)


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals r and its derivative."""
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    grad = np.where(small, r, delta * np.sign(r))
    return loss, grad


def _lse3(t0, t1, t2):
    """log(exp(t0) + exp(t1) + exp(t2)), stable, elementwise."""
    m = np.maximum(np.maximum(t0, t1), t2)
    return m + np.log(np.exp(t0 - m) + np.exp(t1 - m) + np.exp(t2 - m))


def _objective(theta: np.ndarray, logN, logD, logL, delta: float):
    a, b, e, alpha, beta = theta
    t0, t1, t2 = a - alpha * logN, b - beta * logD, np.full_like(logN, e)
    pred = _lse3(t0, t1, t2)
    loss, g = _huber(pred - logL, delta)
    w0, w1, w2 = np.exp(t0 - pred), np.exp(t1 - pred), np.exp(t2 - pred)  # d pred / d term
    grad = np.array(
        [
            np.sum(g * w0),
            np.sum(g * w1),
            np.sum(g * w2),
            -np.sum(g * w0 * logN),
            -np.sum(g * w1 * logD),
        ]
    )
    return float(np.sum(loss)), grad


# Hoffmann et al.'s and Besiroglu et al.'s grid of initialisations (4,500 points).
START_GRID = {
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}
# L-BFGS runs from this many of the grid's points, those of lowest objective: on a 2-core
# machine each run costs ~10 ms, and the best few starts reach the optimum the full grid finds
# (tests/unit/test_scaling_fits.py).
BEST_STARTS = 16


def _starts() -> np.ndarray:
    g = START_GRID
    return np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])))


def _grid_objective(grid: np.ndarray, logN, logD, logL, delta: float) -> np.ndarray:
    """The objective at every grid point at once ([points] from [points, 5])."""
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    pred = _lse3(a - alpha * logN, b - beta * logD, e + 0 * logN)
    return _huber(pred - logL, delta)[0].sum(axis=1)


def _fit3(logN, logD, logL, starts: np.ndarray, delta: float, best: int) -> Chinchilla:
    values = _grid_objective(starts, logN, logD, logL, delta)
    chosen = starts[np.argsort(values)[:best]]
    found = None
    # One BLAS thread: L-BFGS-B's tiny products run 15x slower when OpenBLAS spreads them over
    # the cores of a loaded machine (measured on the 2-core CI machine).
    with threadpool_limits(1, user_api="blas"):
        for x0 in chosen:
            res = minimize(
                _objective, x0, args=(logN, logD, logL, delta), jac=True, method="L-BFGS-B"
            )
            if np.all(np.isfinite(res.x)) and (found is None or res.fun < found.fun):
                found = res
    a, b, e, alpha, beta = found.x
    return Chinchilla(
        E=float(np.exp(e)),
        A=float(np.exp(a)),
        B=float(np.exp(b)),
        alpha=float(alpha),
        beta=float(beta),
        objective=float(found.fun),
    )


def approach3(
    obs: list[Observation], delta: float = HUBER_DELTA, best_starts: int = BEST_STARTS
) -> Chinchilla:
    logN, logD, logL = _logs(obs)
    return _fit3(logN, logD, logL, _starts(), delta, best_starts)


def _logs(obs: list[Observation]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.log([o.N for o in obs]), np.log([o.D for o in obs]), np.log([o.loss for o in obs])


def r_squared(observed, predicted) -> float:
    """Share of the observed losses' variance the fit explains."""
    y, p = np.asarray(observed, float), np.asarray(predicted, float)
    return float(1.0 - np.sum((y - p) ** 2) / np.sum((y - y.mean()) ** 2))


# --- Chinchilla approach 2 -----------------------------------------------------------------


@dataclass
class IsoFlopMinimum:
    C: float
    N_opt: float
    D_opt: float
    loss: float
    parabola_N: tuple[float, float, float]  # loss = p0 x^2 + p1 x + p2, x = log N
    parabola_D: tuple[float, float, float]


@dataclass
class Approach2:
    """N_opt = kN * C**a and D_opt = kD * C**b over the minima of the IsoFLOP profiles."""

    a: float
    kN: float
    b: float
    kD: float
    minima: list[IsoFlopMinimum] = field(default_factory=list)

    def optimal(self, C: float) -> tuple[float, float]:
        return float(self.kN * C**self.a), float(self.kD * C**self.b)


def _parabola_min(x: np.ndarray, y: np.ndarray) -> tuple[float, float, tuple] | None:
    """Vertex of the least-squares parabola through (x, y); None when it opens downward (the
    profile has no minimum inside the sampled sizes)."""
    p = np.polyfit(x, y, 2)
    if p[0] <= 0:
        return None
    xv = -p[1] / (2 * p[0])
    return float(xv), float(np.polyval(p, xv)), tuple(float(v) for v in p)


def isoflop_groups(obs: list[Observation]) -> dict[float, list[Observation]]:
    groups: dict[float, list[Observation]] = {}
    for o in obs:
        if o.budget is not None:
            groups.setdefault(o.budget, []).append(o)
    return dict(sorted(groups.items()))


PROFILE_WINDOW = 5


def _around_minimum(group: list[Observation], width: int) -> list[Observation]:
    """The `width` runs of a profile nearest (by size rank) to its lowest loss: the vertex of a
    parabola through an asymmetric profile's whole span is biased toward its long side."""
    by_size: dict[float, list[Observation]] = {}
    for o in group:  # a bootstrap resample repeats runs: one mean loss per size
        by_size.setdefault(o.N, []).append(o)
    ranked = [
        Observation(g[0].point, n, g[0].D, g[0].C, float(np.mean([o.loss for o in g])), g[0].budget)
        for n, g in sorted(by_size.items())
    ]
    i = min(range(len(ranked)), key=lambda j: ranked[j].loss)
    lo = max(0, min(i - width // 2, len(ranked) - width))
    return ranked[lo : lo + width]


def approach2(obs: list[Observation], window: int = PROFILE_WINDOW) -> Approach2 | None:
    """Fit a parabola of loss against log N (and log D) to the `window` runs around the lowest
    loss of every IsoFLOP profile of at least three runs, take its vertex, and fit power laws of
    the vertices against C. None when fewer than two profiles have a minimum."""
    minima = []
    for C, group in isoflop_groups(obs).items():
        if len({o.N for o in group}) < 3:
            continue
        near = _around_minimum(group, window)
        loss = np.array([o.loss for o in near])
        vn = _parabola_min(np.log([o.N for o in near]), loss)
        vd = _parabola_min(np.log([o.D for o in near]), loss)
        if vn is None or vd is None:
            continue
        minima.append(IsoFlopMinimum(C, np.exp(vn[0]), np.exp(vd[0]), vn[1], vn[2], vd[2]))
    if len(minima) < 2:
        return None
    logC = np.log([m.C for m in minima])
    sa, ia = np.polyfit(logC, np.log([m.N_opt for m in minima]), 1)
    sb, ib = np.polyfit(logC, np.log([m.D_opt for m in minima]), 1)
    return Approach2(float(sa), float(np.exp(ia)), float(sb), float(np.exp(ib)), minima)


# --- bootstrap -----------------------------------------------------------------------------


def _interval(values: list[float], level: float) -> tuple[float, float]:
    lo, hi = np.nanpercentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


BOOTSTRAP_STARTS = 4


def bootstrap(
    obs: list[Observation],
    fit3: Chinchilla,
    samples: int = 100,
    seed: int = 0,
    level: float = 0.95,
    budget_C: float | None = None,
    flops_per_param_token: float = 6.0,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of approach 3's parameters (and approach 2's exponents, and the
    compute-optimal N and D at budget_C) over refits to resampled runs. Each approach 3 refit
    runs L-BFGS from the best BOOTSTRAP_STARTS of the grid plus the full fit's optimum."""
    rng = np.random.default_rng(seed)
    full = np.array([np.log(fit3.A), np.log(fit3.B), np.log(fit3.E), fit3.alpha, fit3.beta])
    starts = np.vstack([full, _starts()])
    logN, logD, logL = _logs(obs)
    draws: dict[str, list[float]] = {}
    for _ in range(samples):
        idx = rng.integers(0, len(obs), len(obs))
        f = _fit3(logN[idx], logD[idx], logL[idx], starts, HUBER_DELTA, BOOTSTRAP_STARTS)
        for k, v in f.params().items():
            draws.setdefault(k, []).append(v)
        draws.setdefault("a (approach 3)", []).append(f.a)
        if budget_C is not None:
            n, d = f.optimal(budget_C, flops_per_param_token)
            draws.setdefault("N_opt (approach 3)", []).append(n)
            draws.setdefault("D_opt (approach 3)", []).append(d)
        # Approach 2: resample inside each IsoFLOP profile.
        resampled = []
        for group in isoflop_groups(obs).values():
            pick = rng.integers(0, len(group), len(group))
            resampled += [group[i] for i in pick]
        fit2 = approach2(resampled) if resampled else None
        if fit2 is not None:
            draws.setdefault("a (approach 2)", []).append(fit2.a)
            draws.setdefault("b (approach 2)", []).append(fit2.b)
    return {k: _interval(v, level) for k, v in draws.items()}
