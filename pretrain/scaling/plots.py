"""The sweep's PNG plots (matplotlib, no display): loss against compute with the frontier,
IsoFLOP profiles with their parabolas and minima, and the L(N, D) fit against observation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pretrain.scaling.fits import Approach2, Chinchilla, Observation


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_vs_compute(
    obs: list[Observation], fit3: Chinchilla, path: Path, flops_per_param_token: float = 6.0
) -> Path:
    """Every run, coloured by size; the empirical frontier (lowest loss at or below each C);
    approach 3's compute-optimal loss L(N_opt(C), D_opt(C)) under C = k N D."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sizes = sorted({o.N for o in obs})
    cmap = plt.get_cmap("viridis")
    for i, n in enumerate(sizes):
        pts = sorted((o.C, o.loss) for o in obs if o.N == n)
        ax.plot(
            *zip(*pts, strict=True),
            "o-",
            color=cmap(i / max(1, len(sizes) - 1)),
            label=f"N={n:.3g}",
            ms=4,
            lw=1,
        )
    cs = np.array(sorted(o.C for o in obs))
    best = [min(o.loss for o in obs if o.C <= c) for c in cs]
    ax.step(cs, best, where="post", color="k", lw=1.5, label="frontier (observed)")
    grid = np.logspace(np.log10(cs[0]), np.log10(cs[-1]), 50)
    opt = [fit3(*fit3.optimal(c, flops_per_param_token)) for c in grid]
    ax.plot(grid, opt, "r--", lw=1.5, label="approach 3 optimum")
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel="loss", title="Loss against compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def isoflop_profiles(obs: list[Observation], fit2: Approach2 | None, path: Path) -> Path:
    """Loss against N on each IsoFLOP profile, the fitted parabola and its vertex."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    from pretrain.scaling.fits import isoflop_groups

    groups = isoflop_groups(obs)
    cmap = plt.get_cmap("plasma")
    minima = {m.C: m for m in (fit2.minima if fit2 else [])}
    for i, (c, group) in enumerate(groups.items()):
        color = cmap(i / max(1, len(groups) - 1))
        pts = sorted((o.N, o.loss) for o in group)
        ax.plot(*zip(*pts, strict=True), "o", color=color, label=f"C={c:.3g}", ms=4)
        if c in minima:
            m = minima[c]
            x = np.linspace(np.log(pts[0][0]), np.log(pts[-1][0]), 50)
            ax.plot(np.exp(x), np.polyval(m.parabola_N, x), "-", color=color, lw=1)
            ax.plot([m.N_opt], [m.loss], "*", color=color, ms=12, mec="k")
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss", title="IsoFLOP profiles")
    if groups:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fit_vs_observed(obs: list[Observation], fit3: Chinchilla, r2: float, path: Path) -> Path:
    """Approach 3's prediction against every observed loss, with the identity line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    y = np.array([o.loss for o in obs])
    p = fit3([o.N for o in obs], [o.D for o in obs])
    ax.scatter(y, p, c=np.log10([o.N for o in obs]), cmap="viridis", s=18)
    lo, hi = min(y.min(), p.min()), max(y.max(), p.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(
        xlabel="observed loss",
        ylabel="L(N, D) fit",
        title=f"Fit against observation, R² = {r2:.3f}",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
