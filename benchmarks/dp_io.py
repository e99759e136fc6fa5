"""Bytes of shard data one data-parallel rank reads, at DP=4 against DP=1.

Rank 0's loader (make_batches, the run's own) serves the same number of optimizer steps at
each size (a quarter of the sequences per rank at DP=4); every shard read is counted by its
file size (data_pipeline.packing reads shards whole). The issue's goal is a ratio of at most
0.30; 1.0 means every rank reads the whole dataset.

usage: python benchmarks/dp_io.py [--data DIR] [--steps N] [--seq-len L] [--micro-batch B]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data_pipeline.packing as packing  # noqa: E402
from data_pipeline.loader import make_batches  # noqa: E402


def bytes_read(data: str, dp: int, steps: int, seq_len: int, micro: int) -> int:
    total = 0
    real = packing.read_shard_stream

    def counted(shard, *args, **kwargs):
        nonlocal total
        total += shard.path.stat().st_size
        return real(shard, *args, **kwargs)

    packing.read_shard_stream = counted
    try:
        loader = make_batches({"path": data, "shuffle_window": 1024}, "train", seq_len, 0, micro,
                              dp_rank=0, dp_size=dp, num_workers=0)  # fmt: skip
        for _ in range(steps):
            loader.next_step()
    finally:
        packing.read_shard_stream = real
    return total


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(ROOT / "data" / "stdlib"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    a = p.parse_args(argv)
    one = bytes_read(a.data, 1, a.steps, a.seq_len, a.micro_batch)
    four = bytes_read(a.data, 4, a.steps, a.seq_len, a.micro_batch)
    print("| data | steps | rank 0 bytes, DP=1 | rank 0 bytes, DP=4 | ratio DP=4 / DP=1 |")
    print("|---|---|---|---|---|")
    print(f"| {Path(a.data).name} | {a.steps} | {one:,} | {four:,} | {four / max(one, 1):.2f} |")
    return four / max(one, 1)


if __name__ == "__main__":
    main()
