"""Training throughput of each parallel layout on 4 processes, as a ratio to data parallelism only.

Each layout is the whole trainer a user runs: `torchrun --nproc-per-node=4 -m pretrain.train` on
the tiny GPT (configs/tiny.yaml, 4 blocks so that 4 pipeline stages fit) with the same global
batch. Two figures per layout, each divided by the DP=4 run's of the same round: the trainer's
own training tokens/s (its summary line, start-up excluded) and the wall time of the whole
process (start-up included). Layouts run in rounds, interleaved, so machine noise hits all alike;
the median of the rounds is reported.

usage: python benchmarks/layouts.py DATA_DIR [--rounds 2] [--steps 40]
Prints a Markdown table for docs/benchmarks.md. On a 2-core machine 4 processes share 2 cores:
the ratios show the cost of each layout's communication and pipeline bubbles, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> overrides; ZeRO-1 everywhere (the stage pipelines support), fp32.
LAYOUTS = {
    "DP4": [],
    "TP2 x DP2": ["parallel.tp=2"],
    "PP2 x DP2": ["parallel.pp=2"],
    "TP2 x PP2": ["parallel.tp=2", "parallel.pp=2"],
    "TP4": ["parallel.tp=4"],
    "PP4": ["parallel.pp=4"],
}


def run_layout(data: str, out: Path, name: str, overrides: list[str], steps: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=4",
        "-m",
        "pretrain.train",
        str(ROOT / "configs/tiny.yaml"),
        f"data.path={data}",
        f"run.output_dir={out}",
        f"run.name={re.sub(r'[^A-Za-z0-9]', '', name)}",
        f"run.train_steps={steps}",
        f"run.log_interval={steps}",
        "run.eval_interval=0",
        "run.eval_batches=0",
        "run.resume=never",
        "model.n_layers=4",
        "parallel.zero_stage=1",
        "parallel.micro_batch_size=4",
        "parallel.global_batch_size=32",
        "tracking.enabled=false",
        "checkpoint.keep_last=1",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    found = re.search(r"trained \d+ steps in .*?\(([\d,]+) tokens/s\)", proc.stdout)
    return {"tokens_per_s": float(found.group(1).replace(",", "")), "wall": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="a dataset directory (pretrain-data build)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, overrides in LAYOUTS.items():
                res = run_layout(args.data, Path(tmp) / f"r{r}", name, overrides, args.steps)
                results[name].append(res)
                print(f"round {r} {name}: {res}", file=sys.stderr, flush=True)
    base = results["DP4"]
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}, tiny GPT (4 blocks, d 64), global batch 32 x 32 tokens, "
        f"{args.steps} steps, ZeRO 1, 4 processes, median of {args.rounds} rounds\n"
    )
    print("| layout | training tokens/s | ratio to DP4 | process wall time (s) | ratio to DP4 |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        tok = statistics.median(x["tokens_per_s"] for x in runs)
        wall = statistics.median(x["wall"] for x in runs)
        tok_ratio = statistics.median(
            x["tokens_per_s"] / b["tokens_per_s"] for x, b in zip(runs, base, strict=True)
        )
        wall_ratio = statistics.median(
            x["wall"] / b["wall"] for x, b in zip(runs, base, strict=True)
        )
        print(f"| {name} | {tok:,.0f} | {tok_ratio:.2f} | {wall:.1f} | {wall_ratio:.2f} |")


if __name__ == "__main__":
    main()
