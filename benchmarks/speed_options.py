"""Speed options end to end: `pretrain-train` with an option against the same run without it.

Each variant is the whole trainer process (loader, logging, evaluation), run one after the
other and alternating the order, `--repeats` times. Two figures against the reference variant
(no override) of the same session: the ratio of the median tokens per CPU second of the whole
training loop (the "training CPU time" line every run prints; other jobs on shared cores
stretch CPU time far less than wall time), which includes a compile on the first step; and
the steady-state speed-up, the ratio of the median step times of the perf lines of the run's
second half.

usage: python benchmarks/speed_options.py [CONFIG] [--threads 1] [--repeats 3] [--steps N]
       [--option NAME=OVERRIDE ...] [--set key=value ...]
Prints one Markdown table row per option.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

from e2e_parity import BIN, CPU_LINE, ROOT

PERF_LINE = re.compile(
    r"step +(\d+) \| perf: data ([\d.]+) ms, fwd\+bwd ([\d.]+) ms, optimizer ([\d.]+) ms, "
    r"comm ([\d.]+) ms"
)


def run_one(cmd: list[str], threads: int, steps: int) -> tuple[float, float]:
    """(tokens per CPU second of the whole training loop, steady step time in ms): the
    median over the perf lines of the run's second half of the measured step time (data +
    forward/backward + optimizer + communication), which leaves out the first step, where
    torch.compile compiles."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    per_cpu = CPU_LINE.search(done.stdout)
    steady = [
        sum(float(x) for x in m.groups()[1:])
        for m in PERF_LINE.finditer(done.stdout)
        if int(m.group(1)) > steps // 2
    ]
    if done.returncode or not per_cpu or not steady:
        raise SystemExit(f"{cmd[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return float(per_cpu.group(1).replace(",", "")), statistics.median(steady)


DEFAULT_OPTIONS = [
    "foreach AdamW=optim.implementation=foreach",
    "fused AdamW=optim.implementation=fused",
    "torch.compile of the blocks=run.compile=true",
]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config", nargs="?", default="configs/char.yaml")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--option", action="append", default=None, help="NAME=key=value")
    p.add_argument("--set", action="append", default=[], help="config override for all runs")
    a = p.parse_args(argv)
    options = [o.split("=", 1) for o in (a.option or DEFAULT_OPTIONS)]
    print(
        f"| option ({Path(a.config).name}, {a.threads} thread(s), {a.steps} steps) | "
        "tokens per CPU second / reference (whole loop) | steady step speed-up (reference / "
        "option step time, second half) | per-CPU-second ratios |"
    )
    print("|---|---|---|---|", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="speed_options_") as tmp:
        work = Path(tmp)
        base = [
            str(BIN / "pretrain-train"),
            a.config,
            f"run.train_steps={a.steps}",
            f"run.output_dir={work / 'runs'}",
            "run.resume=never",
            "run.sample_tokens=0",
            "tracking.enabled=false",
            *a.set,
        ]
        for name, override in options:
            got: dict[str, list[tuple[float, float]]] = {"ref": [], "opt": []}
            for rep in range(a.repeats):
                order = [("ref", base), ("opt", [*base, override])]
                for key, cmd in order if rep % 2 == 0 else order[::-1]:
                    subprocess.run(["rm", "-rf", str(work / "runs")], check=True)
                    got[key].append(run_one(cmd, a.threads, a.steps))
            per_cpu = {k: statistics.median(x[0] for x in v) for k, v in got.items()}
            step_ms = {k: statistics.median(x[1] for x in v) for k, v in got.items()}
            ratios = [o[0] / r[0] for o, r in zip(got["opt"], got["ref"], strict=True)]
            row = {
                "option": name,
                "cpu_ratio": per_cpu["opt"] / per_cpu["ref"],
                "steady_speedup": step_ms["ref"] / step_ms["opt"],
                "step_ms": (step_ms["ref"], step_ms["opt"]),
                "all": ratios,
            }
            rows.append(row)
            print(
                f"| {name} (`{override}`) | {row['cpu_ratio']:.3f} | "
                f"{row['steady_speedup']:.3f} ({step_ms['ref']:.1f} / {step_ms['opt']:.1f} ms) | "
                f"{', '.join(f'{x:.2f}' for x in ratios)} |",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
