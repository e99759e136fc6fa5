"""The global stream of packed sequences of one split of one dataset, by global index.

1. each epoch visits the split's shards in an order shuffled by (seed, epoch);
2. the documents of those shards, each followed by the end-of-document token, form one token
   stream;
3. sequence i of the epoch is stream[i*L : i*L + L + overlap]: with overlap 1 (the causal
   objective) inputs and shifted targets share L of those tokens, so no token is wasted;
4. sequences are shuffled inside consecutive windows of `shuffle_window` by a permutation drawn
   from (seed, epoch, window); with `shuffle_run` k > 1 the permutation moves runs of k
   adjacent sequences, each kept in order (k = 1, the default, moves single sequences).

Global sequence g is sequence g % N of epoch g // N, so any range of global sequences can be
produced directly, without replaying the ones before it. Only the tokens of the sequences asked
for are read (``data_pipeline.range_reads``): a data-parallel rank reads about 1/DP of the data.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.dataset import SHARD_FIX, DatasetInfo, Shard
from data_pipeline.errors import DataError
from data_pipeline.range_reads import RangeReader, WholeReader, open_reader

SEED_MASK = 2**64 - 1  # numpy seeds must be non-negative; run.seed may not be


class PackedSequences:
    """Sequences of `seq_len + overlap` tokens cut every `seq_len` tokens from the packed stream
    of one split; global sequence g is produced by `rows(g, 1)`."""

    def __init__(
        self,
        info: DatasetInfo,
        split: str,
        seq_len: int,
        seed: int,
        shuffle_window: int = 1,
        shuffle_shards: bool = True,
        shuffle_run: int = 1,
        cache_shards: int = 2,
        overlap: int = 1,
        vocab_limit: int | None = None,
    ):
        self.info, self.split, self.seq_len, self.seed = info, split, seq_len, seed
        self.overlap = overlap
        self.shards = info.split(split)
        self.shuffle_window = shuffle_window
        self.shuffle_shards = shuffle_shards
        self.shuffle_run = shuffle_run
        # When set, every shard is checked on reading: an id at or above it would index past
        # the model's embedding (a silent error on some devices, an assert on others).
        self.vocab_limit = vocab_limit
        total = sum(s.stream_length for s in self.shards)
        self.per_epoch = (total - overlap) // seq_len
        if self.per_epoch < 1:
            raise DataError(
                f"the '{split}' split of {info.path} has {total} tokens, fewer than "
                f"one sequence of {seq_len + overlap}; use more data or a smaller seq_len"
            )
        self._cache: OrderedDict[Path, RangeReader | WholeReader] = OrderedDict()
        self._verified: set[Path] = set()  # shards whose checksum this process has checked
        self._cache_size = cache_shards
        self._window_shards = 1  # shards the current shuffle window spans
        self._window_key: tuple[int, int] | None = None
        self._window_val: np.ndarray | None = None
        self._epoch_key: int | None = None
        self._epoch_val: tuple[list[Shard], np.ndarray] | None = None
        self.bytes_read = 0  # shard bytes this process read from disk
        # Set by the loader when this process serves every sequence (DP=1, at most one
        # worker): each shuffle window's tokens are then read in one pass on first use.
        self.dense = False

    @property
    def length(self) -> int:
        """Tokens per sequence."""
        return self.seq_len + self.overlap

    @property
    def infos(self) -> list[DatasetInfo]:
        return [self.info]

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes started with spawn receive a pickled copy: send no cached tokens.
        state = dict(self.__dict__)
        state.update(_cache=OrderedDict(), _window_key=None, _window_val=None, bytes_read=0)
        return state

    def identity(self) -> dict[str, Any]:
        """What a loader state must match to resume on this data."""
        return {
            "fingerprint": self.info.fingerprint,
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle_window": self.shuffle_window,
            "shuffle_run": self.shuffle_run,
        }

    def epoch_of(self, consumed: int) -> float:
        """Passes over the split after `consumed` global sequences."""
        return consumed / self.per_epoch

    def mixture(self, consumed: int) -> list[dict[str, Any]]:
        """Sequences served from each dataset (here one) after `consumed` global sequences."""
        return [
            {
                "path": str(self.info.path),
                "weight": 1.0,
                "sequences": consumed,
                "fraction": 1.0,
                "epochs": consumed / self.per_epoch,
            }
        ]

    def shard_order(self, epoch: int) -> list[Shard]:
        if not self.shuffle_shards:
            return self.shards
        rng = np.random.default_rng([self.seed & SEED_MASK, epoch, 0])
        return [self.shards[i] for i in rng.permutation(len(self.shards))]

    def _reader(self, shard: Shard) -> RangeReader | WholeReader:
        if shard.path not in self._cache:
            # A shard read whole has its sha256 checked on this process's first read only: a
            # re-read (the cache is small) costs no second hash. A range reader checks each
            # chunk's crc32 when it reads the chunk.
            first = shard.path not in self._verified
            reader = open_reader(shard, self.info.eos_id, self.info.dtype, verify=first)
            self.bytes_read += reader.bytes_read
            self._verified.add(shard.path)
            self._cache[shard.path] = reader
            # Every shard of the current window stays: its sequences are asked for in random
            # order, and an evicted shard would be read again within the window.
            while len(self._cache) > max(self._cache_size, self._window_shards):
                self._cache.popitem(last=False)
        self._cache.move_to_end(shard.path)
        return self._cache[shard.path]

    def _gather(self, shard: Shard, positions: np.ndarray, rows: bool = False) -> np.ndarray:
        """The shard's stream at `positions`, or with `rows` the [n, length] rows starting
        at `positions` (each inside the shard)."""
        reader = self._reader(shard)
        before = reader.bytes_read
        tokens = reader.rows(positions, self.length) if rows else reader.gather(positions)
        self.bytes_read += reader.bytes_read - before
        if self.vocab_limit is not None and tokens.size and tokens.max() >= self.vocab_limit:
            # The model was checked against token_counts.npz before the run, so an id
            # beyond it here is a shard that does not match its dataset.
            raise DataError(
                f"shard {shard.path} holds token id {int(tokens.max())}, beyond the "
                f"{self.vocab_limit} embedding rows that the dataset's token counts allowed: "
                f"the shard is corrupt or from another dataset; {SHARD_FIX}"
            )
        return tokens

    def _epoch(self, epoch: int) -> tuple[list[Shard], np.ndarray]:
        """The epoch's shard order and the stream position where each shard ends."""
        if self._epoch_key != epoch:
            order = self.shard_order(epoch)
            ends = np.cumsum([s.stream_length for s in order], dtype=np.int64)
            self._epoch_key, self._epoch_val = epoch, (order, ends)
        return self._epoch_val

    def _sequences(self, epoch: int, index: np.ndarray) -> np.ndarray:
        """Sequences `index` of an epoch as a [len(index), length] array: the tokens
        index*L .. index*L + length - 1 of the epoch's stream."""
        order, ends = self._epoch(epoch)
        starts = index * self.seq_len
        first = np.searchsorted(ends, starts, side="right")
        inside = first == np.searchsorted(ends, starts + self.length - 1, side="right")
        out = np.empty((len(index), self.length), dtype=self.info.dtype)
        if inside.all() and first.min() == first.max():
            i = int(first[0])
            return self._gather(order[i], starts - (ends[i] - order[i].stream_length), rows=True)
        for i in np.unique(first[inside]):
            mine = inside & (first == i)
            local = starts[mine] - (ends[i] - order[i].stream_length)
            out[mine] = self._gather(order[i], local, rows=True)
        if not inside.all():  # rows that run from one shard into the next, token by token
            cross = np.flatnonzero(~inside)
            positions = starts[cross, None] + np.arange(self.length)
            shard = np.searchsorted(ends, positions, side="right")
            part = np.empty(positions.shape, dtype=self.info.dtype)
            for i in np.unique(shard):
                mine = shard == i
                part[mine] = self._gather(
                    order[i], positions[mine] - (ends[i] - order[i].stream_length)
                )
            out[cross] = part
        return out

    def _window(self, epoch: int, window: int) -> np.ndarray:
        """The order to emit the window's sequences in (window-relative indices). The last
        window's is kept: consecutive micro-batches mostly fall in the same one."""
        if self._window_key == (epoch, window):
            return self._window_val
        first = window * self.shuffle_window
        n = min(self.shuffle_window, self.per_epoch - first)
        ends = self._epoch(epoch)[1]
        last_token = (first + n) * self.seq_len + self.overlap - 1
        self._window_shards = int(
            np.searchsorted(ends, last_token, side="right")
            - np.searchsorted(ends, first * self.seq_len, side="right")
            + 1
        )
        if self.shuffle_window == 1:
            order = np.arange(n)
        else:
            rng = np.random.default_rng([self.seed & SEED_MASK, epoch, window + 1])
            order = _run_permutation(rng, n, self.shuffle_run)
        self._window_key, self._window_val = (epoch, window), order
        if self.dense:
            self._prefetch(epoch, first * self.seq_len, last_token + 1)
        return order

    def _prefetch(self, epoch: int, start: int, stop: int) -> None:
        order, ends = self._epoch(epoch)
        for i in range(int(np.searchsorted(ends, start, side="right")), len(order)):
            begin = int(ends[i]) - order[i].stream_length
            if begin >= stop:
                break
            reader = self._reader(order[i])
            before = reader.bytes_read
            reader.prefetch(max(start - begin, 0), min(stop, int(ends[i])) - begin)
            self.bytes_read += reader.bytes_read - before

    def rows(self, start: int, count: int) -> np.ndarray:
        """Global sequences start .. start + count - 1 as a new [count, length] array."""
        return self.rows_at(np.arange(start, start + count, dtype=np.int64))

    def rows_at(self, index: np.ndarray) -> np.ndarray:
        """Global sequences `index` (any order) as a new [len(index), length] array: one
        call for a whole group of micro-batches, so numpy's per-call cost is paid once."""
        index = np.asarray(index, dtype=np.int64)
        epoch, pos = np.divmod(index, self.per_epoch)
        window, offset = np.divmod(pos, self.shuffle_window)
        key = epoch * (self.per_epoch // self.shuffle_window + 1) + window
        sequence = np.empty_like(index)
        for k in np.unique(key):
            mine = key == k
            i = int(np.argmax(mine))
            order = self._window(int(epoch[i]), int(window[i]))
            sequence[mine] = window[i] * self.shuffle_window + order[offset[mine]]
        out = np.empty((len(index), self.length), dtype=self.info.dtype)
        for e in np.unique(epoch):
            mine = epoch == e
            out[mine] = self._sequences(int(e), sequence[mine])
        return out


def _run_permutation(rng: np.random.Generator, n: int, run: int) -> np.ndarray:
    """A permutation of range(n) that moves runs of `run` consecutive indices (the last run
    may be shorter), each kept in order. With run 1 it is rng.permutation(n), the order every
    run had before runs existed.

    Why runs: a data-parallel rank takes a contiguous slice of each global batch, so with
    runs it serves runs of adjacent sequences, which share the 256-byte chunks its reader
    rounds each read out to. Short sequences (128 tokens are 258 bytes at 2 bytes an id) read
    one by one cost about two chunks each: at DP=4 a rank reads 0.40 of DP=1's bytes, with
    runs of 4 0.27 (benchmarks/dp_io.py).
    """
    runs = rng.permutation(-(-n // run))  # with run 1: rng.permutation(n) itself
    order = (runs[:, None] * run + np.arange(run)).ravel()
    return order[order < n]
