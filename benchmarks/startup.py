"""Start-up time of a tiny run, launch to first step, by phase.

Two measurements in one go:

1. `pretrain-launch configs/tiny.yaml --nproc-per-node 2` with a few steps: the ranks' own
   start-up line (pretrain.lifecycle.StartupClock: imports and checks, process groups (with
   DeepSpeed's and megatron's imports), model, engine, data, hooks) and the wall time of the
   whole launch, repeated ROUNDS times; the median of each.
2. The reference, in fresh single processes of the same interpreter: `import torch` alone, and
   the imports a rank needs before it can train (torch, DeepSpeed, megatron-core, our trainer).

usage: python benchmarks/startup.py [--data DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).parent / "pretrain-launch"
STARTUP = re.compile(r"start-up: ([\d.]+) s from launch to the first step \((.*)\)")
RANK_IMPORTS = (
    "import torch, deepspeed, megatron.core.parallel_state, pretrain.trainer, "
    "pretrain.engine, data_pipeline.loader"
)


def timed_python(code: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t


def one_launch(data: str, runs: Path, i: int) -> tuple[float, float, dict[str, float]]:
    t = time.perf_counter()
    proc = subprocess.run(
        [
            str(LAUNCH),
            "configs/tiny.yaml",
            "--nproc-per-node",
            "2",
            f"data.path={data}",
            f"run.output_dir={runs}",
            f"run.name=startup{i}",
            "run.train_steps=5",
            "run.eval_interval=0",
            "run.sample_tokens=0",
            "tracking.enabled=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    wall = time.perf_counter() - t
    m = STARTUP.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        sys.exit(f"launch failed:\n{proc.stdout}\n{proc.stderr}")
    phases = {}
    for part in m.group(2).split(", "):
        name, seconds = part.rsplit(" ", 1)
        phases[name] = float(seconds)
    return wall, float(m.group(1)), phases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "stdlib"))
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch_import = statistics.median(timed_python("import torch") for _ in range(args.rounds))
    rank_imports = statistics.median(timed_python(RANK_IMPORTS) for _ in range(args.rounds))
    with tempfile.TemporaryDirectory() as tmp:
        runs = [one_launch(args.data, Path(tmp), i) for i in range(args.rounds)]
    wall = statistics.median(r[0] for r in runs)
    startup = statistics.median(r[1] for r in runs)
    names = list(runs[0][2])
    print(f"reference: `import torch` {torch_import:.1f} s; a rank's imports {rank_imports:.1f} s")
    print(f"launch wall time (5 steps, exit included) {wall:.1f} s = {wall / torch_import:.1f}x")
    print(f"start-up, launch to first step: {startup:.1f} s = {startup / torch_import:.1f}x")
    print(f"| phase | seconds (median of {args.rounds}) | x `import torch` |")
    print("|---|---|---|")
    for name in names:
        s = statistics.median(r[2][name] for r in runs)
        print(f"| {name} | {s:.1f} | {s / torch_import:.2f} |")


if __name__ == "__main__":
    main()
