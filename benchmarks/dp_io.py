"""Bytes of shard data one data-parallel rank reads, at DP=1, 2 and 4, for the same training.

The global batch is fixed (`--global-batch` sequences per step, split over the ranks), so each
size serves the same sequences in total and a rank at DP=4 serves a quarter of them. Each
rank's loader (make_batches, the run's own) counts the bytes it reads from disk
(PackedSequences.bytes_read: range-index files, shard chunks, or whole shards); the table gives
rank 0's and the largest over the ranks, and their ratio to DP=1. The reference row is the same
dataset without its range index (as built before indexes existed), read whole shard by shard.
Rows "runs of K" shuffle runs of K adjacent sequences (data.shuffle_run=K) instead of single
ones, so that a rank's sequences come in runs that share chunks. The issue's goal is a
DP=4 / DP=1 ratio of at most 0.30.

The figures count what the reader asks the file system for; on a local disk the page cache
rounds each read up to whole 4 KiB pages (sequences of 2 KiB or more are little affected).

usage: python benchmarks/dp_io.py [--data DIR] [--tokens N | --steps N] [--seq-len L ...]
                                  [--global-batch G] [--chunk-bytes B] [--shuffle-run K ...]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow.parquet as pq  # noqa: E402

from data_pipeline.dataset import DatasetInfo  # noqa: E402
from data_pipeline.loader import make_batches  # noqa: E402
from data_pipeline.shard_index import CHUNK_BYTES  # noqa: E402
from data_pipeline.shards import MANIFEST_FILE, OPTIONAL_COLUMNS, add_range_indexes  # noqa: E402

# The shuffle window, in sequences. Runs serve whole windows: at DP=1 a process reads each
# window in one pass when it first needs it, so a run that stopped inside a window would
# count for DP=1 bytes that DP=4 ranks had not reached yet.
WINDOW = 1024


def bytes_read(
    data: str, dp: int, rank: int, steps: int, seq_len: int, global_batch: int, run: int = 1
) -> int:
    """Bytes rank `rank` of `dp` reads to serve `steps` global batches."""
    settings = {"path": data, "shuffle_window": WINDOW, "shuffle_run": run}
    loader = make_batches(settings, "train", seq_len, 0, global_batch // dp, dp_rank=rank,
                          dp_size=dp, num_workers=0)  # fmt: skip
    for _ in range(steps):
        loader.next_step()
    return loader.sequences.bytes_read


def prepare(data: Path, scratch: Path, chunk_bytes: int) -> tuple[str, str]:
    """(an indexed copy, a copy without index) of the dataset at `data`."""
    indexed, whole = scratch / "indexed", scratch / "whole"
    shutil.copytree(data, indexed)
    if any(s.index_sha256 is None for s in DatasetInfo(indexed).split("train")):
        add_range_indexes(indexed, chunk_bytes)
    shutil.copytree(indexed, whole)
    manifest = whole / MANIFEST_FILE
    pq.write_table(pq.read_table(manifest).drop_columns(list(OPTIONAL_COLUMNS)), manifest)
    return str(indexed), str(whole)


def main(argv: list[str] | None = None) -> dict[tuple[int, int], float]:
    """The DP=4 / DP=1 ratio of range reads, by (seq_len, shuffle run)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(ROOT / "data" / "stdlib"))
    p.add_argument("--tokens", type=int, default=1_000_000,
                   help="tokens served, rounded to whole shuffle windows (at least one); "
                        "under one epoch of data/stdlib (2.5M) no shard is read twice")  # fmt: skip
    p.add_argument("--steps", type=int, help="steps at every seq_len (overrides --tokens)")
    p.add_argument("--seq-len", type=int, nargs="+", default=[128, 1024, 2048])
    p.add_argument("--global-batch", type=int, default=32, help="a multiple of 4")
    p.add_argument(
        "--chunk-bytes",
        type=int,
        default=CHUNK_BYTES,
        help="chunk size of the index added to a copy of an unindexed dataset",
    )
    p.add_argument("--shuffle-run", type=int, nargs="+", default=[1, 4],
                   help="data.shuffle_run values to measure range reads at")  # fmt: skip
    a = p.parse_args(argv)
    ratios = {}
    print(f"global batch {a.global_batch} sequences; bytes read per rank (rank 0 / the largest "
          f"of the ranks) and the ratio of the largest to DP=1's\n")  # fmt: skip
    print("| seq_len | steps | reader | DP=1 | DP=2 | DP=4 | DP=2 / DP=1 | DP=4 / DP=1 |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        indexed, whole = prepare(Path(a.data), Path(tmp), a.chunk_bytes)
        for seq_len in a.seq_len:
            windows = max(1, round(a.tokens / (WINDOW * seq_len)))
            steps = a.steps or windows * WINDOW // a.global_batch
            readers = [("range reads" if k == 1 else f"range reads, runs of {k}", indexed, k)
                       for k in a.shuffle_run]  # fmt: skip
            for name, data, run in [*readers, ("whole shards (no index)", whole, 1)]:
                per_dp = {}
                for dp in (1, 2, 4):
                    counts = [bytes_read(data, dp, r, steps, seq_len, a.global_batch, run)
                              for r in range(dp)]  # fmt: skip
                    per_dp[dp] = (counts[0], max(counts))
                cells = [f"{r0:,} / {top:,}" for r0, top in per_dp.values()]
                two, four = (per_dp[d][1] / max(per_dp[1][1], 1) for d in (2, 4))
                row = [str(seq_len), str(steps), name, *cells, f"{two:.2f}", f"{four:.2f}"]
                print(f"| {' | '.join(row)} |")
                if data == indexed:
                    ratios[seq_len, run] = four
    return ratios


if __name__ == "__main__":
    main()
