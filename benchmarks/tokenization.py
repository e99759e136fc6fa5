"""Tokenizing throughput of the dataset builder: one worker process against all cores, same run.

Corpus: the demo corpus, the standard library's .py files (data_pipeline.sources.stdlib_sources).
A BPE tokenizer is trained on it first (not timed), or --tokenizer gives one. Then, alternating
1 worker and N workers for --rounds rounds so machine noise hits both:

- encode: the stage the workers parallelize (documents already in memory -> chunks -> worker
  processes -> id arrays back in order), in MB of UTF-8 text per second, median of the rounds;
- build: one whole `build` with the tokenizer given (read, encode, write shards, hash), seconds;
- reference: Hugging Face tokenizers' own parallel `encode_batch` over the same documents with
  N threads (a fresh process per round), MB/s; the column "ours N / HF N" is the ratio.

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


HF_REFERENCE = """
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
docs = json.load(open(sys.argv[2]))
tok.encode_batch(docs[:8], add_special_tokens=False)  # the thread pool starts
t0 = time.perf_counter()
n = sum(len(e.ids) for e in tok.encode_batch(docs, add_special_tokens=False))
print(time.perf_counter() - t0, n)
"""


def hf_encode_seconds(tokenizer_json: str, documents: list[str], threads: int, tmp: str) -> float:
    """Wall seconds of Hugging Face tokenizers' own parallel `encode_batch` over the documents,
    in a fresh process whose Rust thread pool has `threads` threads (the reference the builder's
    encode stage is held to: the same files, the same cores)."""
    import json
    import subprocess

    docs = Path(tmp) / "documents.json"
    if not docs.exists():
        docs.write_text(json.dumps(documents))
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run(
        [sys.executable, "-c", HF_REFERENCE, tokenizer_json, str(docs)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.split()[0])


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
        hf_json = tokenizer
        if tokenizer == "bytes":
            hf_json = str(Path(tmp) / "bytes.json")
            tok.save(hf_json)
        hf_walls: list[float] = []
        for _ in range(args.rounds):
            hf_walls.append(hf_encode_seconds(hf_json, documents, args.workers, tmp))
            print(f"HF encode_batch, {args.workers} threads: {hf_walls[-1]:.2f} s", flush=True)
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
    hf = megabytes / statistics.median(hf_walls)
    # Other processes' load: on a shared machine it, not our code, can decide the speed-up.
    load = f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"
    print(f"\n{len(documents)} documents, {megabytes:.1f} MB; {cpu_name()}, ", end="")
    print(f"{available_cores()} cores available; load average before / after {load}\n")
    print(
        "| date | corpus | tokenizer | workers | encode MB/s, 1 worker | encode MB/s, N workers "
        "| speed-up | encode CPU s, 1 / N | build s, 1 worker | build s, N workers "
        "| HF encode_batch MB/s, N threads | ours N / HF N | load avg before / after |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {datetime.date.today()} | stdlib, {megabytes:.1f} MB | {name} | {args.workers} "
        f"| {one:.2f} | {many:.2f} | {many / one:.2f} | {cpu_one:.1f} / {cpu_many:.1f} "
        f"| {builds[1]:.1f} "
        f"| {builds[args.workers]:.1f} | {hf:.2f} | {many / hf:.2f} | {load} |"
    )


if __name__ == "__main__":
    main()
