"""Several datasets mixed by weight, in an order that is a pure function of the weights.

Each dataset keeps its own packed stream (its own shard order, windows and epochs). Global
sequence g of the blend is sequence `position` of dataset `d`, both computed in closed form
from g, so a resume jumps straight to any index and the realised mixture after any number of
sequences is known without replaying them.

The schedule is a chain of Bresenham lines. Dataset 0 takes a share p0 = w0 of the stream:
of the first n sequences it owns c0(n) = floor(n * p0 + 1/2), and sequence i is its own when
c0(i + 1) > c0(i), as its c0(i)-th. The sequences it does not take form a stream of their own,
which dataset 1 shares in the same way with p1 = w1 / (w1 + ... + wK-1), and so on; the last
dataset takes the rest. Each dataset's count stays within one sequence per level of its exact
share, and datasets are interleaved evenly rather than in runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipeline.blend_spec import parse_blend_entry
from data_pipeline.dataset import DatasetInfo
from data_pipeline.digest import json_sha256
from data_pipeline.errors import DataError
from data_pipeline.packing import PackedSequences


def parse_blend(entries: Sequence[str]) -> list[tuple[float, str]]:
    """(weight, path) of each "WEIGHT PATH" entry of data.blend; DataError on a bad entry."""
    out = []
    for i, entry in enumerate(entries):
        try:
            out.append(parse_blend_entry(entry))
        except ValueError as e:
            raise DataError(f"data.blend[{i}] = {entry!r}: {e}") from None
    if not out:
        raise DataError("data.blend is empty; list 'WEIGHT PATH' entries or use data.path")
    return out


def open_datasets(path: str, blend: Sequence[str] = ()) -> list[tuple[float, DatasetInfo]]:
    """(weight, dataset) for data.blend when it is non-empty, else [(1.0, data.path)].

    Blended datasets must share their tokenizer: the same id must mean the same token.
    """
    if not blend:
        return [(1.0, DatasetInfo(path))]
    pairs = [(w, DatasetInfo(p)) for w, p in parse_blend(blend)]
    first = pairs[0][1]
    for _, info in pairs[1:]:
        if info.tokenizer_sha256 != first.tokenizer_sha256:
            raise DataError(
                f"datasets {first.path} and {info.path} in data.blend were built with "
                f"different tokenizers; rebuild one with `pretrain-data build --tokenizer "
                f"{first.tokenizer_file}` so that ids mean the same tokens"
            )
    return pairs


class BlendSchedule:
    """Which dataset serves each global sequence, and as which of its own sequences."""

    def __init__(self, weights: Sequence[float]):
        if not weights or any(not (math.isfinite(w) and w > 0) for w in weights):
            raise DataError(f"blend weights {list(weights)} must be positive numbers")
        total = math.fsum(weights)
        self.weights = [w / total for w in weights]
        # Share of level k among the sequences that datasets 0 .. k-1 did not take.
        self._share = [w / math.fsum(self.weights[k:]) for k, w in enumerate(self.weights[:-1])]

    def _taken(self, level: int, n: np.ndarray | np.integer) -> np.ndarray:
        return np.floor(n * self._share[level] + 0.5).astype(np.int64)

    def assign(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, position within that dataset's stream) of each global index."""
        rest = np.asarray(index, dtype=np.int64)
        dataset = np.full(rest.shape, len(self.weights) - 1, dtype=np.int64)
        position = np.zeros(rest.shape, dtype=np.int64)
        open_ = np.ones(rest.shape, dtype=bool)
        for level in range(len(self._share)):
            before, after = self._taken(level, rest), self._taken(level, rest + 1)
            mine = open_ & (after > before)
            dataset[mine], position[mine] = level, before[mine]
            open_ &= ~mine
            rest = rest - before  # index among the sequences left to the later datasets
        position[open_] = rest[open_]
        return dataset, position

    def counts(self, n: int) -> np.ndarray:
        """Sequences of each dataset among global sequences 0 .. n-1."""
        out, rest = [], np.int64(n)
        for level in range(len(self._share)):
            taken = int(self._taken(level, rest))
            out.append(taken)
            rest -= taken
        return np.array([*out, int(rest)], dtype=np.int64)


class BlendedSequences:
    """Global sequences of several PackedSequences (same geometry) mixed by weight."""

    def __init__(self, sources: Sequence[PackedSequences], weights: Sequence[float]):
        if len(sources) != len(weights) or not sources:
            raise ValueError("one weight per source, at least one source")
        geometry = {(s.seq_len, s.overlap, s.info.dtype) for s in sources}
        if len(geometry) != 1:
            raise ValueError(f"blended sources differ in (seq_len, overlap, dtype): {geometry}")
        self.sources = list(sources)
        self.schedule = BlendSchedule(weights)
        first = self.sources[0]
        self.seq_len, self.overlap, self.length = first.seq_len, first.overlap, first.length
        self.split, self.seed, self.shuffle_window = first.split, first.seed, first.shuffle_window
        self.shuffle_run = first.shuffle_run
        self.info = first.info  # the shared tokenizer's ids

    @property
    def infos(self) -> list[DatasetInfo]:
        return [s.info for s in self.sources]

    @property
    def per_epoch(self) -> int:
        """Sequences in one pass over every dataset (for logging; epochs count per dataset)."""
        return sum(s.per_epoch for s in self.sources)

    def identity(self) -> dict[str, Any]:
        """What a loader state must match to resume: the fingerprint covers every dataset's
        fingerprint and weight, in order."""
        parts = [
            [w, s.info.fingerprint]
            for w, s in zip(self.schedule.weights, self.sources, strict=True)
        ]
        return {
            "fingerprint": json_sha256({"blend": parts}),
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle_window": self.shuffle_window,
            "shuffle_run": self.shuffle_run,
        }

    def rows(self, start: int, count: int) -> np.ndarray:
        """Global sequences start .. start + count - 1 as a new [count, length] array."""
        dataset, position = self.schedule.assign(np.arange(start, start + count))
        out = np.empty((count, self.length), dtype=self.info.dtype)
        for d, source in enumerate(self.sources):
            mine = np.flatnonzero(dataset == d)
            if len(mine):
                # A dataset's sequences within a contiguous global range are consecutive
                # sequences of its own stream.
                out[mine] = source.rows(int(position[mine[0]]), len(mine))
        return out

    def rows_at(self, index: np.ndarray) -> np.ndarray:
        """Global sequences `index` (any order) as a new [len(index), length] array."""
        dataset, position = self.schedule.assign(index)
        out = np.empty((len(index), self.length), dtype=self.info.dtype)
        for d, source in enumerate(self.sources):
            mine = np.flatnonzero(dataset == d)
            if len(mine):
                out[mine] = source.rows_at(position[mine])
        return out

    def epoch_of(self, consumed: int) -> float:
        """Passes over the most-repeated dataset after `consumed` global sequences."""
        counts = self.schedule.counts(consumed)
        return max(int(c) / s.per_epoch for c, s in zip(counts, self.sources, strict=True))

    def mixture(self, consumed: int) -> list[dict[str, Any]]:
        """Sequences served from each dataset among the first `consumed`, with the fraction
        realised and the weight asked for."""
        counts = self.schedule.counts(consumed)
        return [
            {
                "path": str(s.info.path),
                "weight": w,
                "sequences": int(c),
                "fraction": int(c) / consumed if consumed else 0.0,
                "epochs": int(c) / s.per_epoch,
            }
            for w, c, s in zip(self.schedule.weights, counts, self.sources, strict=True)
        ]
