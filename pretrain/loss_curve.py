"""The loss-curve PNG logged with every finished MLflow run."""

from __future__ import annotations

from pathlib import Path


def plot_loss_curve(
    curves: dict[str, list[tuple[int, float]]], path: Path, title: str = ""
) -> Path:
    """Plot each named series of (step, value) points against the optimizer step into `path`.
    Uses matplotlib's object API with the Agg canvas: no display, and safe off the main thread
    (pyplot's global figure state is neither)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, points in curves.items():
        if points:
            steps, values = zip(*sorted(points), strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, ms=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    if title:
        ax.set_title(title)
    if any(curves.values()):
        ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
