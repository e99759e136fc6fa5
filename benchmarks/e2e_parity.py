"""End-to-end parity: `pretrain-train` as a whole process against benchmarks/plain_gpt.py.

Both train the config's GPT with its hyperparameters, log, evaluation and checkpoint cadence
in a process of their own, one after the other (alternating which goes first), `--repeats`
times per thread count. The figure is the ratio of the median tokens/s each prints in its
"trained N steps in S s (T tokens/s)" summary (the training loop with its evaluations and
saves, start-up excluded); the whole process's wall and CPU time are reported beside it, and
the ratio of tokens per CPU second of the loops (each prints its loop's CPU time), which other
jobs on shared cores stretch far less than wall time (one thread per process). The plain
script reads the dataset's splits as flat token files written here first.

usage: python benchmarks/e2e_parity.py [CONFIG ...] [--threads 1 2] [--repeats 3]
       [--steps N] [--set key=value ...]
Prints one Markdown table row per (config, threads).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.dataset import DatasetInfo, read_shard_stream  # noqa: E402
from pretrain.config import load_config, resolve_vocab  # noqa: E402

SUMMARY = re.compile(r"trained (\d+) steps in [\d.]+ s \(([\d,]+) tokens/s\)")
CPU_LINE = re.compile(r"training CPU time: [\d.]+ s \(([\d,]+) tokens per CPU second\)")
BIN = Path(sys.executable).parent


def flat_files(cfg, out: Path) -> tuple[Path, Path, str]:
    """The dataset's train and val splits as flat token files (documents + EOS, in order)."""
    info = DatasetInfo(cfg.data.path)
    paths = []
    for split in ("train", "val"):
        path = out / f"{split}.bin"
        with path.open("wb") as f:
            for shard in info.split(split):
                read_shard_stream(shard, info.eos_id, info.dtype).tofile(f)
        paths.append(path)
    return paths[0], paths[1], np.dtype(info.dtype).name


def commands(config: str, sets: list[str], work: Path) -> tuple[list[str], list[str]]:
    cfg = load_config(config, sets)
    cfg = resolve_vocab(cfg, DatasetInfo(cfg.data.path).vocab_size)
    m, r, o = cfg.model, cfg.run, cfg.optim
    train, val, dtype = flat_files(cfg, work)
    ours = [
        str(BIN / "pretrain-train"),
        config,
        *sets,
        f"run.output_dir={work / 'runs'}",
        "run.resume=never",
        "run.sample_tokens=0",
    ]
    plain = [
        sys.executable,
        str(ROOT / "benchmarks/plain_gpt.py"),
        f"--train={train}",
        f"--val={val}",
        f"--dtype={dtype}",
        f"--vocab={m.vocab_size}",
        f"--layers={m.n_layers}",
        f"--d-model={m.d_model}",
        f"--heads={m.n_heads}",
        f"--seq-len={m.seq_len}",
        f"--micro-batch={cfg.parallel.micro_batch_size}",
        f"--steps={r.train_steps}",
        f"--lr={o.lr}",
        f"--min-lr={o.min_lr}",
        f"--warmup={o.warmup_steps}",
        f"--weight-decay={o.weight_decay}",
        f"--grad-clip={o.grad_clip}",
        f"--log-interval={r.log_interval}",
        f"--eval-interval={r.eval_interval}",
        f"--eval-batches={r.eval_batches}",
        f"--ckpt-interval={cfg.checkpoint.interval}",
        f"--out={work}",
    ]
    return ours, plain


def run_one(cmd: list[str], threads: int, work: Path) -> tuple[float, float, float, float]:
    """(tokens/s of the summary line, whole-process wall seconds, its CPU seconds, tokens per
    CPU second of the training loop)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    subprocess.run(["rm", "-rf", str(work / "runs")], check=True)
    t0, cpu0 = time.perf_counter(), _child_cpu()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall, cpu = time.perf_counter() - t0, _child_cpu() - cpu0
    match, per_cpu = SUMMARY.search(done.stdout), CPU_LINE.search(done.stdout)
    if done.returncode or not match or not per_cpu:
        raise SystemExit(f"{cmd[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return (
        float(match.group(2).replace(",", "")),
        wall,
        cpu,
        float(per_cpu.group(1).replace(",", "")),
    )


def _child_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def measure(config: str, sets: list[str], threads: list[int], repeats: int):
    """One row (dict) per thread count, yielded as soon as it is measured."""
    with tempfile.TemporaryDirectory(prefix="e2e_parity_") as tmp:
        work = Path(tmp)
        ours, plain = commands(config, sets, work)
        for t in threads:
            got: dict[str, list[tuple[float, ...]]] = {"ours": [], "plain": []}
            for rep in range(repeats):
                order = [("ours", ours), ("plain", plain)]
                for name, cmd in order if rep % 2 == 0 else order[::-1]:
                    got[name].append(run_one(cmd, t, work))
            med = {k: statistics.median(x[0] for x in v) for k, v in got.items()}
            wall = {k: statistics.median(x[1] for x in v) for k, v in got.items()}
            cpu = {k: statistics.median(x[2] for x in v) for k, v in got.items()}
            per_cpu = {k: statistics.median(x[3] for x in v) for k, v in got.items()}
            yield (
                {
                    "config": Path(config).name,
                    "threads": t,
                    "ours": med["ours"],
                    "plain": med["plain"],
                    "ratio": med["ours"] / med["plain"],
                    "wall_ours": wall["ours"],
                    "wall_plain": wall["plain"],
                    "cpu_ours": cpu["ours"],
                    "cpu_plain": cpu["plain"],
                    "cpu_ratio": per_cpu["ours"] / per_cpu["plain"],
                    "all_ratios": [
                        o[0] / p[0] for o, p in zip(got["ours"], got["plain"], strict=True)
                    ],
                }
            )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("configs", nargs="*", default=["configs/demo.yaml", "configs/char.yaml"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="override run.train_steps")
    p.add_argument("--set", action="append", default=[], help="config override for both")
    a = p.parse_args(argv)
    sets = list(a.set) + ([f"run.train_steps={a.steps}"] if a.steps else [])
    print(
        "| config | threads | ours tokens/s | plain tokens/s | ratio (median) | ratios | "
        "ratio of tokens per CPU second | process wall ours / plain | process CPU ours / plain |"
    )
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for config in a.configs:
        for r in measure(config, sets, a.threads, a.repeats):
            rows.append(r)
            print(
                f"| {r['config']} | {r['threads']} | {r['ours']:,.0f} | {r['plain']:,.0f} | "
                f"{r['ratio']:.3f} | {', '.join(f'{x:.2f}' for x in r['all_ratios'])} | "
                f"{r['cpu_ratio']:.3f} | {r['wall_ours']:.1f} s / {r['wall_plain']:.1f} s | "
                f"{r['cpu_ours']:.1f} s / {r['cpu_plain']:.1f} s |",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
