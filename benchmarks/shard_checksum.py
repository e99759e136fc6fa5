"""What the sha256 check on a shard's first read costs: every training shard of a dataset read
with `read_shard_stream` (the loader's reader) without and with `verify`, alternating, 5 rounds;
medians. The reference is the read without the check, measured in the same run.

usage: python benchmarks/shard_checksum.py [--data DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.dataset import DatasetInfo, read_shard_stream  # noqa: E402

ROUNDS = 5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "stdlib"))
    args = p.parse_args()
    info = DatasetInfo(args.data)
    shards = info.split("train")
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(ROUNDS):
        for verify in (False, True):
            t = time.perf_counter()
            for shard in shards:
                read_shard_stream(shard, info.eos_id, info.dtype, verify=verify)
            seconds[verify].append(time.perf_counter() - t)
    plain, checked = (statistics.median(seconds[v]) for v in (False, True))
    mb = sum(s.bytes or 0 for s in shards) / 1e6
    print(
        f"{len(shards)} shards, {mb:.1f} MB: read {plain * 1e3:.0f} ms, read with sha256 "
        f"{checked * 1e3:.0f} ms ({checked / plain:.2f}x the read)"
    )


if __name__ == "__main__":
    main()
