"""Tokenizing throughput of the dataset builder: one worker process against all cores, same run.

Corpus: the demo corpus, the standard library's .py files (data_pipeline.sources.stdlib_sources).
A BPE tokenizer is trained on it first (not timed), or --tokenizer gives one. Then, alternating
1 worker and N workers for --rounds rounds so machine noise hits both:

- encode: the stage the workers parallelize (documents already in memory -> chunks -> worker
  processes -> id arrays back in order), in MB of UTF-8 text per second, median of the rounds;
- build: one whole `build` with the tokenizer given (read, encode, write shards, hash), seconds.

usage: python benchmarks/tokenization.py [--workers N] [--rounds R] [--tokenizer FILE|bytes]
Prints a Markdown table row for docs/benchmarks.md.
"""

from __future__ import annotations

import os
import sys

# This file's name shadows the standard library's `tokenize` (which linecache, traceback and
# inspect import) while its directory is on sys.path: take the directory off before anything
# imports it, and put the repository root on instead.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, os.path.dirname(HERE))

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from data_pipeline.build import build  # noqa: E402
from data_pipeline.encode import available_cores, chunk_documents, encode_in_order  # noqa: E402
from data_pipeline.sources import iter_documents, stdlib_sources  # noqa: E402
from data_pipeline.tokenizer import Tokenizer  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def encode_seconds(tok: Tokenizer, documents: list[str], workers: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, tokens) to encode ``documents`` with ``workers`` processes.

    CPU seconds do not depend on what else runs on the machine: on shared cores they tell
    whether the workers add work, when the wall time cannot tell how they would scale.
    """
    start, cpu = time.perf_counter(), cpu_seconds()
    tokens = 0
    chunks = chunk_documents(documents, lambda: None)
    for _, (_, ids) in encode_in_order(tok, chunks, np.uint16, workers):
        tokens += ids.size
    return time.perf_counter() - start, cpu_seconds() - cpu, tokens


def build_seconds(tokenizer: str, workers: int) -> float:
    """Seconds of a whole build of the stdlib corpus with a given tokenizer."""
    with tempfile.TemporaryDirectory() as tmp:
        result = build(
            stdlib_sources(),
            Path(tmp) / "ds",
            tokenizer=tokenizer,
            val_fraction=0.05,
            workers=workers,
            progress=False,
        )
        return result.seconds


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=available_cores())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokenizer", help="tokenizer.json or 'bytes' (default: train BPE 4096)")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    documents = list(iter_documents(stdlib_sources()))
    megabytes = sum(len(d.encode("utf-8")) for d in documents) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        if args.tokenizer is None:
            tok = Tokenizer.train(iter(documents), vocab_size=4096)
            tokenizer, name = str(Path(tmp) / "tokenizer.json"), "BPE 4096"
            tok.save(tokenizer)
        else:
            tokenizer = args.tokenizer
            tok = Tokenizer.bytes() if tokenizer == "bytes" else Tokenizer.load(tokenizer)
            name = "bytes" if tokenizer == "bytes" else Path(tokenizer).name
        walls = {1: [], args.workers: []}
        cpus = {1: [], args.workers: []}
        for _ in range(args.rounds):
            for workers in walls:
                seconds, cpu, tokens = encode_seconds(tok, documents, workers)
                walls[workers].append(seconds)
                cpus[workers].append(cpu)
                print(
                    f"encode, {workers} workers: {seconds:.2f} s, {cpu:.2f} CPU s, "
                    f"{tokens:,} tokens",
                    flush=True,
                )
        builds = {w: build_seconds(tokenizer, w) for w in walls}
    one, many = (megabytes / statistics.median(walls[w]) for w in (1, args.workers))
    cpu_one, cpu_many = (statistics.median(cpus[w]) for w in (1, args.workers))
    # Other processes' load: on a shared machine it, not our code, can decide the speed-up.
    load = f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"
    print(f"\n{len(documents)} documents, {megabytes:.1f} MB; {cpu_name()}, ", end="")
    print(f"{available_cores()} cores available; load average before / after {load}\n")
    print(
        "| date | corpus | tokenizer | workers | encode MB/s, 1 worker | encode MB/s, N workers "
        "| speed-up | encode CPU s, 1 / N | build s, 1 worker | build s, N workers "
        "| load avg before / after |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {datetime.date.today()} | stdlib, {megabytes:.1f} MB | {name} | {args.workers} "
        f"| {one:.2f} | {many:.2f} | {many / one:.2f} | {cpu_one:.1f} / {cpu_many:.1f} "
        f"| {builds[1]:.1f} "
        f"| {builds[args.workers]:.1f} | {load} |"
    )


if __name__ == "__main__":
    main()
