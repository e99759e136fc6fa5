"""The global stream of packed sequences of one split of one dataset, by global index.

1. each epoch visits the split's shards in an order shuffled by (seed, epoch);
2. the documents of those shards, each followed by the end-of-document token, form one token
   stream;
3. sequence i of the epoch is stream[i*L : i*L + L + overlap]: with overlap 1 (the causal
   objective) inputs and shifted targets share L of those tokens, so no token is wasted;
4. sequences are shuffled inside consecutive windows of `shuffle_window` by a permutation drawn
   from (seed, epoch, window).

Global sequence g is sequence g % N of epoch g // N, so any range of global sequences can be
produced directly, without replaying the ones before it.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.dataset import SHARD_FIX, DatasetInfo, Shard, read_shard_stream
from data_pipeline.errors import DataError

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
        cache_shards: int = 2,
        overlap: int = 1,
        vocab_limit: int | None = None,
    ):
        self.info, self.split, self.seq_len, self.seed = info, split, seq_len, seed
        self.overlap = overlap
        self.shards = info.split(split)
        self.shuffle_window = shuffle_window
        self.shuffle_shards = shuffle_shards
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
        self._cache: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._verified: set[Path] = set()  # shards whose checksum this process has checked
        self._cache_size = cache_shards
        self._window_key: tuple[int, int] | None = None
        self._window_val: tuple[np.ndarray, np.ndarray] | None = None

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
        state.update(_cache=OrderedDict(), _window_key=None, _window_val=None)
        return state

    def identity(self) -> dict[str, Any]:
        """What a loader state must match to resume on this data."""
        return {
            "fingerprint": self.info.fingerprint,
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle_window": self.shuffle_window,
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

    def _shard_tokens(self, shard: Shard) -> np.ndarray:
        if shard.path not in self._cache:
            # The checksum on this process's first read only: a re-read (the cache is small)
            # costs no second hash, and what changed since would be no bit rot of ours.
            first = shard.path not in self._verified
            tokens = read_shard_stream(shard, self.info.eos_id, self.info.dtype, verify=first)
            self._verified.add(shard.path)
            if self.vocab_limit is not None and len(tokens) and tokens.max() >= self.vocab_limit:
                # The model was checked against token_counts.npz before the run, so an id
                # beyond it here is a shard that does not match its dataset.
                raise DataError(
                    f"shard {shard.path} holds token id {int(tokens.max())}, beyond the "
                    f"{self.vocab_limit} embedding rows that the dataset's token counts allowed: "
                    f"the shard is corrupt or from another dataset; {SHARD_FIX}"
                )
            self._cache[shard.path] = tokens
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return self._cache[shard.path]

    def _read_range(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Stream tokens [start, stop) of an epoch."""
        order = self.shard_order(epoch)
        ends = np.cumsum([s.stream_length for s in order]).tolist()
        first = bisect.bisect_right(ends, start)
        pieces, pos = [], start
        for i in range(first, len(order)):
            shard_start = ends[i] - order[i].stream_length
            if shard_start >= stop:
                break
            tokens = self._shard_tokens(order[i])
            pieces.append(tokens[pos - shard_start : min(stop, ends[i]) - shard_start])
            pos = min(stop, ends[i])
        return np.concatenate(pieces)

    def _window(self, epoch: int, window: int) -> tuple[np.ndarray, np.ndarray]:
        """The window's sequences as an [n, length] view, and the order to emit them in.
        The last window is kept: consecutive micro-batches mostly fall in the same one."""
        if self._window_key == (epoch, window):
            return self._window_val
        first = window * self.shuffle_window
        n = min(self.shuffle_window, self.per_epoch - first)
        L = self.seq_len
        tokens = self._read_range(epoch, first * L, (first + n) * L + self.overlap)
        seqs = np.lib.stride_tricks.sliding_window_view(tokens, self.length)[::L]
        if self.shuffle_window == 1:
            order = np.arange(n)
        else:
            rng = np.random.default_rng([self.seed & SEED_MASK, epoch, window + 1])
            order = rng.permutation(n)
        self._window_key, self._window_val = (epoch, window), (seqs, order)
        return seqs, order

    def rows(self, start: int, count: int) -> np.ndarray:
        """Global sequences start .. start + count - 1 as a new [count, length] array."""
        out = np.empty((count, self.length), dtype=self.info.dtype)
        done = 0
        while done < count:
            epoch, pos = divmod(start + done, self.per_epoch)
            window, offset = divmod(pos, self.shuffle_window)
            seqs, order = self._window(epoch, window)
            take = min(count - done, len(order) - offset)
            out[done : done + take] = seqs[order[offset : offset + take]]
            done += take
        return out
