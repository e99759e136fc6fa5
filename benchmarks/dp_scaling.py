"""Data-parallel scaling: `pretrain-train` on 2 processes against 1, same per-process batch.

Both launches train the config with one thread per process (torchrun, gloo), alternating which
goes first over `--repeats` rounds. Tokens/s is what each run's summary line prints (global
tokens over the loop's time); the figure is the ratio 2-process / 1-process, 2.0 being perfect
scaling (the machine must have a core per process for that).

usage: python benchmarks/dp_scaling.py [CONFIG] [--steps N] [--repeats R] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from e2e_parity import BIN, run_one  # noqa: E402


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config", nargs="?", default="configs/demo.yaml")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args(argv)
    got: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="dp_scaling_") as tmp:
        work = Path(tmp)
        for rep in range(a.repeats):
            for n in (1, 2) if rep % 2 == 0 else (2, 1):
                cmd = [
                    sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={n}", str(BIN / "pretrain-train"), a.config, *a.set,
                    f"run.train_steps={a.steps}", f"run.output_dir={work / 'runs'}",
                    "run.resume=never", "run.sample_tokens=0", "tracking.enabled=false",
                ]  # fmt: skip
                got[n].append(run_one(cmd, 1, work)[0])
    one, two = statistics.median(got[1]), statistics.median(got[2])
    print("| config | steps | 1 process tokens/s | 2 processes tokens/s | ratio 2/1 |")
    print("|---|---|---|---|---|")
    print(f"| {Path(a.config).name} | {a.steps} | {one:,.0f} | {two:,.0f} | {two / one:.2f} |")
    return two / one


if __name__ == "__main__":
    main()
