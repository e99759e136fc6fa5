"""End-to-end parity: `pretrain-train` as a whole process against benchmarks/plain_gpt.py.

Both train the config's GPT with its hyperparameters, log, evaluation and checkpoint cadence
in a process of their own, `--repeats` pairs per thread count. Where the machine has cores for
both (2 x threads), a pair runs at the same time, each process pinned to cores of its own and
the cores swapped at every repeat (see `measure`); otherwise, or with --sequential, one after
the other, alternating which goes first. The figure is the median over the pairs of the ratio
of the tokens/s each prints in its "trained N steps in S s (T tokens/s)" summary (the training
loop with its evaluations and saves, start-up excluded); the whole process's wall and CPU time
are reported beside it, and the ratio of tokens per CPU second of the loops (each prints its
loop's CPU time). The plain script reads the dataset's splits as flat token files written here
first.

With `--against CHECKOUT` the reference is not the plain script but `pretrain-train` of another
checkout of this repository (its code on PYTHONPATH, this checkout's virtual environment): the
same pairs then measure what a change does to the whole process, e.g. against a worktree of
the commit before it (`git worktree add /tmp/base HEAD~1`).

usage: python benchmarks/e2e_parity.py [CONFIG ...] [--threads 1 2] [--repeats 3]
       [--steps N] [--set key=value ...] [--sequential] [--against CHECKOUT]
Prints one Markdown table row per (config, threads).
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


def commands(
    config: str, sets: list[str], work: Path, against: Path | None = None
) -> tuple[list[str], list[str]]:
    """(ours, the reference): `pretrain-train` and the plain script, or with `against` the
    other checkout's `pretrain-train` (its own run directory, its code first on the path)."""
    cfg = load_config(config, sets)
    cfg = resolve_vocab(cfg, DatasetInfo(cfg.data.path).vocab_size)
    ours = [
        str(BIN / "pretrain-train"),
        config,
        *sets,
        f"run.output_dir={work / 'runs'}",
        "run.resume=never",
        "run.sample_tokens=0",
    ]
    if against is not None:
        ref_runs = f"run.output_dir={work / 'runs_ref'}"
        return ours, ["env", f"PYTHONPATH={against.resolve()}", *ours[:-3], ref_runs, *ours[-2:]]
    m, r, o = cfg.model, cfg.run, cfg.optim
    train, val, dtype = flat_files(cfg, work)
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


def _env(threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_many(
    cmds: list[list[str]], threads: int, cores: list[set[int]] | None, work: Path
) -> list[tuple[float, float, float, float]]:
    """Run `cmds` at the same time, each pinned to its `cores` (None: one after the other, on
    any core). Per command: (tokens/s of the summary line, whole-process wall seconds, its CPU
    seconds, tokens per CPU second of the training loop)."""
    if cores is None:
        return [run_many([cmd], threads, [set()], work)[0] for cmd in cmds]
    t0, procs = time.perf_counter(), []
    for i, (cmd, mine) in enumerate(zip(cmds, cores, strict=True)):
        pin = (lambda c=mine: os.sched_setaffinity(0, c)) if mine else None
        log = (work / f"out{i}.txt").open("w")
        procs.append(
            subprocess.Popen(
                cmd,
                env=_env(threads),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                preexec_fn=pin,
            )
        )
        log.close()
    ended = {}
    for _ in procs:  # wait4 reaps each child with its own resource use
        pid, status, use = os.wait4(-1, 0)
        ended[pid] = (time.perf_counter() - t0, os.waitstatus_to_exitcode(status), use)
    results = []
    for i, (cmd, proc) in enumerate(zip(cmds, procs, strict=True)):
        proc.returncode = 0  # reaped above; Popen must not wait for it again
        wall, code, use = ended[proc.pid]
        out = (work / f"out{i}.txt").read_text()
        match, per_cpu = SUMMARY.search(out), CPU_LINE.search(out)
        if code or not match or not per_cpu:
            raise SystemExit(f"{cmd[0]} failed ({code}):\n{out}")
        results.append(
            (
                float(match.group(2).replace(",", "")),
                wall,
                use.ru_utime + use.ru_stime,
                float(per_cpu.group(1).replace(",", "")),
            )
        )
    return results


def run_one(cmd: list[str], threads: int, work: Path) -> tuple[float, float, float, float]:
    """One command on any core, its run directory (`work`/runs) emptied first; as run_many."""
    subprocess.run(["rm", "-rf", str(work / "runs")], check=True)
    return run_many([cmd], threads, None, work)[0]


def pair_cores(threads: int, paired: bool) -> tuple[set[int], set[int]] | None:
    """Two disjoint sets of `threads` cores for a pair run at the same time, or None (one
    after the other) where this process has too few cores or pairs are off."""
    mine = sorted(os.sched_getaffinity(0))
    if not paired or len(mine) < 2 * threads:
        return None
    return set(mine[:threads]), set(mine[threads : 2 * threads])


def measure(
    config: str,
    sets: list[str],
    threads: list[int],
    repeats: int,
    paired: bool = True,
    against: Path | None = None,
):
    """One row (dict) per thread count, yielded as soon as it is measured.

    Paired (where the cores allow): each repeat runs both processes at the same time, each
    pinned to cores of its own, swapping the cores at every repeat. Other jobs and the
    virtual machine's own drift then slow both alike, and the ratio of the pair holds where
    runs one after the other differ by 10-20% on a shared VM. The figure is the median ratio
    over the pairs."""
    with tempfile.TemporaryDirectory(prefix="e2e_parity_") as tmp:
        work = Path(tmp)
        ours, plain = commands(config, sets, work, against)
        for t in threads:
            got: dict[str, list[tuple[float, ...]]] = {"ours": [], "plain": []}
            cores = pair_cores(t, paired)
            for rep in range(repeats):
                subprocess.run(
                    ["rm", "-rf", str(work / "runs"), str(work / "runs_ref")], check=True
                )
                order = [("ours", ours), ("plain", plain)]
                if rep % 2:
                    order = order[::-1]  # the other core (paired) or the other turn
                got_now = run_many([c for _, c in order], t, list(cores) if cores else None, work)
                for (name, _), result in zip(order, got_now, strict=True):
                    got[name].append(result)
            ratios = [o[0] / p[0] for o, p in zip(got["ours"], got["plain"], strict=True)]
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
                    "ratio": statistics.median(ratios),
                    "paired": cores is not None,
                    "wall_ours": wall["ours"],
                    "wall_plain": wall["plain"],
                    "cpu_ours": cpu["ours"],
                    "cpu_plain": cpu["plain"],
                    "cpu_ratio": per_cpu["ours"] / per_cpu["plain"],
                    "all_ratios": ratios,
                }
            )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("configs", nargs="*", default=["configs/demo.yaml", "configs/char.yaml"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="override run.train_steps")
    p.add_argument("--set", action="append", default=[], help="config override for both")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="run each pair one after the other, not at the same time on cores of their own",
    )
    p.add_argument(
        "--against",
        type=Path,
        default=None,
        help="another checkout whose pretrain-train is the reference instead of the plain script",
    )
    a = p.parse_args(argv)
    if a.against is not None and not (a.against / "pretrain" / "__init__.py").is_file():
        # Without it the reference would import this checkout's code and measure it twice.
        p.error(f"--against {a.against}: no pretrain/ package there; give a checkout of this repo")
    sets = list(a.set) + ([f"run.train_steps={a.steps}"] if a.steps else [])
    ref = "plain" if a.against is None else f"reference ({a.against})"
    print(
        f"| config | threads | pairs | ours tokens/s | {ref} tokens/s | ratio (median) | ratios | "
        f"ratio of tokens per CPU second | process wall ours / {ref} | process CPU ours / {ref} |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for config in a.configs:
        for r in measure(config, sets, a.threads, a.repeats, not a.sequential, a.against):
            rows.append(r)
            print(
                f"| {r['config']} | {r['threads']} | "
                f"{'at the same time' if r['paired'] else 'one after the other'} | "
                f"{r['ours']:,.0f} | {r['plain']:,.0f} | "
                f"{r['ratio']:.3f} | {', '.join(f'{x:.2f}' for x in r['all_ratios'])} | "
                f"{r['cpu_ratio']:.3f} | {r['wall_ours']:.1f} s / {r['wall_plain']:.1f} s | "
                f"{r['cpu_ours']:.1f} s / {r['cpu_plain']:.1f} s |",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
