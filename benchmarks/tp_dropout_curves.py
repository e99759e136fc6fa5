"""Loss curves with dropout: TP=2 against TP=1, the tiny GPT, through the real entry point.

With dropout on, TP=2 cannot reproduce TP=1 step for step: the attention-probability masks of
each TP rank's heads come from the model-parallel generator (pretrain/models/rng.py), seeded
per TP rank, so the draws differ from TP=1's. What must hold is that training is statistically
the same: both curves fall alike and end at the same loss within the noise of dropout. A bug
that gave both TP ranks one mask (correlated heads) or dropped different elements of the
replicated residual stream on each rank would show here as a gap or a slower curve.

usage: .venv/bin/python benchmarks/tp_dropout_curves.py [STEPS] [DATA]
  (default 300 steps, data/stdlib: build it with
   .venv/bin/pretrain-data build --stdlib --out data/stdlib --vocab-size 4096 --val-fraction 0.05)
Writes docs/tp_dropout_curves.png and prints a Markdown table for docs/benchmarks.md.
Under torchrun (RANK set) it is the per-launch worker instead: train, dump the losses as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DROPOUT = 0.1
SMOOTH = 25  # steps per moving-average window for the table and the plot


def overrides(steps: int, data: str, out: Path, tp: int) -> list[str]:
    return [
        f"data.path={data}",
        f"run.output_dir={out / 'runs'}",
        f"run.name=tp{tp}",
        f"run.train_steps={steps}",
        f"run.log_interval={max(steps // 10, 1)}",
        "run.eval_interval=0",
        "run.eval_batches=8",
        "run.sample_tokens=0",
        "run.device=cpu",
        f"model.dropout={DROPOUT}",
        f"parallel.tp={tp}",
        "tracking.enabled=false",
    ]


def worker(out_json: str, argv: list[str]) -> None:
    """One launch: the entry point's own prepare/setup/run, then the per-step losses."""
    from pretrain import distributed
    from pretrain.train import prepare, run

    cfg, info, resume_from = prepare(argv)
    layout = distributed.setup(cfg)
    t0 = time.perf_counter()
    trainer = run(cfg, info, resume_from, layout)
    seconds = time.perf_counter() - t0
    if layout.is_main:
        # The evaluation at the end of the run, as the trainer's EvalHook logged it.
        log = (cfg.run.run_dir / "train.log").read_text()
        val = re.findall(r"val loss ([0-9.]+)", log)
        result = {
            "losses": [m["loss"] for m in trainer.history],
            "val_loss": float(val[-1]) if val else float("nan"),
            "seconds": seconds,
        }
        Path(out_json).write_text(json.dumps(result))
    distributed.teardown()


def launch(tp: int, steps: int, data: str, out: Path) -> dict:
    result = out / f"tp{tp}.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={tp}",
        str(Path(__file__).resolve()),
        str(result),
        str(ROOT / "configs" / "tiny.yaml"),
        *overrides(steps, data, out, tp),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"TP={tp} launch failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(result.read_text())


def smooth(xs: list[float], w: int = SMOOTH) -> list[float]:
    return [
        sum(xs[max(0, i - w + 1) : i + 1]) / len(xs[max(0, i - w + 1) : i + 1])
        for i in range(len(xs))
    ]


def plot(curves: dict[int, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for tp, losses in curves.items():
        steps = range(1, len(losses) + 1)
        ax.plot(steps, losses, alpha=0.25, linewidth=0.8, label=f"TP={tp} per step")
        ax.plot(steps, smooth(losses), linewidth=1.8, label=f"TP={tp} mean of {SMOOTH}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(f"tiny GPT, dropout {DROPOUT}: TP=2 vs TP=1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    data = sys.argv[2] if len(sys.argv) > 2 else str(ROOT / "data" / "stdlib")
    if not Path(data).is_dir():
        sys.exit(f"no dataset at {data}; build one (see this script's docstring)")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {tp: launch(tp, steps, data, Path(tmp)) for tp in (1, 2)}
    curves = {tp: r["losses"] for tp, r in runs.items()}
    png = ROOT / "docs" / "tp_dropout_curves.png"
    plot(curves, png)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"command: .venv/bin/python benchmarks/tp_dropout_curves.py {steps}")
    print(f"date: {time.strftime('%Y-%m-%d')}; plot: {png.relative_to(ROOT)}\n")
    print(
        f"| TP | first {SMOOTH} steps | steps {steps // 2 - SMOOTH + 1}-{steps // 2} | "
        f"last {SMOOTH} steps | val loss | wall s |"
    )
    print("|---|---|---|---|---|---|")
    for tp, r in runs.items():
        sm = smooth(r["losses"])
        print(
            f"| {tp} | {sum(r['losses'][:SMOOTH]) / SMOOTH:.3f} | {sm[steps // 2 - 1]:.3f} | "
            f"{sm[-1]:.3f} | {r['val_loss']:.3f} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    if "RANK" in os.environ:
        worker(sys.argv[1], sys.argv[2:])
    else:
        main()
