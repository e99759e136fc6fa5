"""Streaming, packed, data-parallel batches from webdataset shards, resumable to the sequence.

The order of training sequences is a pure function of (dataset fingerprint, seed, epoch):

1. each epoch visits the split's shards in an order shuffled by (seed, epoch);
2. the documents of those shards, each followed by the end-of-document token, form one token
   stream; sequence i of the epoch is stream[i*L : i*L + L + 1] (inputs and shifted targets share
   L of those tokens, so no token is wasted);
3. sequences are shuffled inside consecutive windows of `shuffle_window` by a permutation drawn
   from (seed, epoch, window).

Global sequence g is sequence g % N of epoch g // N. A data-parallel rank r of R takes its
contiguous slice of each global batch. The loader's whole position is the number of global
sequences consumed, an integer that does not depend on R: a run resumes exactly, at the same or
another data-parallel size, by jumping to the window that holds it (no replay from the start).
"""

from __future__ import annotations

import bisect
import json
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import webdataset as wds

from data_pipeline.errors import DataError


@dataclass(frozen=True)
class Shard:
    path: Path
    documents: int
    tokens: int

    @property
    def stream_length(self) -> int:
        """Tokens this shard contributes to the stream: its documents plus one EOS each."""
        return self.tokens + self.documents


class DatasetInfo:
    """The metadata of a dataset directory written by `pretrain-data build`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / "dataset.json"
        if not meta_file.is_file():
            raise DataError(
                f"no dataset at {self.path} (missing dataset.json); build one with "
                f"`pretrain-data build --out {self.path} ...` or fix data.path"
            )
        self.meta = json.loads(meta_file.read_text())
        self.fingerprint: str = self.meta["fingerprint"]
        tok = self.meta["tokenizer"]
        self.vocab_size: int = tok["vocab_size"]
        self.eos_id: int = tok["eos_id"]
        self.tokenizer_file = self.path / tok["file"]
        table = pq.read_table(self.path / "manifest.parquet").to_pylist()
        self.shards: dict[str, list[Shard]] = {}
        for row in table:
            self.shards.setdefault(row["split"], []).append(
                Shard(self.path / row["shard"], int(row["documents"]), int(row["tokens"]))
            )

    def split(self, name: str) -> list[Shard]:
        shards = self.shards.get(name, [])
        if not shards:
            raise DataError(
                f"dataset {self.path} has no '{name}' split; rebuild it with a "
                f"non-zero share for that split"
            )
        return shards


def read_shard_stream(shard: Shard, eos_id: int) -> np.ndarray:
    """All documents of one shard, each followed by EOS, as one array in the shard's token
    dtype (uint16 for vocabularies up to 65536: a quarter of int64's memory in the window)."""
    pieces = []
    try:
        samples = wds.WebDataset(
            str(shard.path),
            shardshuffle=False,
            nodesplitter=None,
            workersplitter=None,
            empty_check=False,
        ).decode()
        for sample in samples:
            doc = sample["npy"]
            pieces += [doc, np.array([eos_id], dtype=doc.dtype)]
    except (OSError, ValueError, KeyError, tarfile.TarError) as e:
        raise DataError(
            f"cannot read shard {shard.path} ({e}); run `pretrain-data verify` on "
            f"the dataset and rebuild it"
        ) from None
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32)
    if len(stream) != shard.stream_length:
        raise DataError(
            f"shard {shard.path} holds {len(stream) - len(pieces) // 2} tokens in "
            f"{len(pieces) // 2} documents, the manifest says {shard.tokens} in "
            f"{shard.documents}: it is truncated or corrupt; rebuild the dataset"
        )
    return stream


class PackedSequences:
    """The global stream of packed sequences (L + 1 tokens each) of one split."""

    def __init__(
        self,
        info: DatasetInfo,
        split: str,
        seq_len: int,
        seed: int,
        shuffle_window: int = 1,
        shuffle_shards: bool = True,
        cache_shards: int = 2,
    ):
        self.info, self.split, self.seq_len, self.seed = info, split, seq_len, seed
        self.shards = info.split(split)
        self.shuffle_window = shuffle_window
        self.shuffle_shards = shuffle_shards
        total = sum(s.stream_length for s in self.shards)
        self.per_epoch = (total - 1) // seq_len
        if self.per_epoch < 1:
            raise DataError(
                f"the '{split}' split of {info.path} has {total} tokens, fewer than "
                f"one sequence of {seq_len + 1}; use more data or a smaller seq_len"
            )
        self._cache: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._cache_size = cache_shards

    def shard_order(self, epoch: int) -> list[Shard]:
        if not self.shuffle_shards:
            return self.shards
        perm = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.shards))
        return [self.shards[i] for i in perm]

    def _shard_tokens(self, shard: Shard) -> np.ndarray:
        if shard.path not in self._cache:
            self._cache[shard.path] = read_shard_stream(shard, self.info.eos_id)
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
        """The window's sequences as an [n, L+1] view, and the order to emit them in."""
        first = window * self.shuffle_window
        n = min(self.shuffle_window, self.per_epoch - first)
        L = self.seq_len
        tokens = self._read_range(epoch, first * L, (first + n) * L + 1)
        seqs = np.lib.stride_tricks.sliding_window_view(tokens, L + 1)[::L]
        if self.shuffle_window == 1:
            order = np.arange(n)
        else:
            order = np.random.default_rng([self.seed, epoch, window + 1]).permutation(n)
        return seqs, order

    def iter_from(self, index: int) -> Iterator[np.ndarray]:
        """Global sequences index, index + 1, ... forever (epoch after epoch)."""
        while True:
            epoch, pos = divmod(index, self.per_epoch)
            window = pos // self.shuffle_window
            seqs, order = self._window(epoch, window)
            for j in range(pos - window * self.shuffle_window, len(order)):
                yield seqs[order[j]]
                index += 1


class DistributedBatches:
    """This rank's micro-batches of each global batch, with a DP-size-free resumable position.

    A global batch is `micro_batch * dp_size * grad_accum` consecutive global sequences; rank r
    takes the r-th contiguous part and splits it into `grad_accum` micro-batches.
    """

    def __init__(
        self,
        sequences: PackedSequences,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        grad_accum: int = 1,
    ):
        self.sequences = sequences
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size
        self.grad_accum = grad_accum
        self.global_batch = micro_batch * dp_size * grad_accum
        self.consumed = 0
        self._it: Iterator[np.ndarray] | None = None

    @property
    def epoch(self) -> float:
        return self.consumed / self.sequences.per_epoch

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for the next optimizer step.

        A batch is a dict of named tensors that the model takes as keyword arguments; for the
        causal objective {"tokens": [b, L], "targets": [b, L]}, targets shifted by one.
        """
        if self._it is None:
            self._it = self.sequences.iter_from(self.consumed)
        batch = [next(self._it) for _ in range(self.global_batch)]
        self.consumed += self.global_batch
        per_rank = self.global_batch // self.dp_size
        mine = np.stack(batch[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank])
        mine = mine.astype(np.int64)  # embedding lookups take int64 ids
        tokens = torch.from_numpy(mine)
        micro = tokens.split(self.micro_batch)
        return [{"tokens": m[:, :-1].contiguous(), "targets": m[:, 1:].contiguous()} for m in micro]

    def state_dict(self) -> dict[str, Any]:
        s = self.sequences
        return {
            "consumed": self.consumed,
            "fingerprint": s.info.fingerprint,
            "split": s.split,
            "seq_len": s.seq_len,
            "seed": s.seed,
            "shuffle_window": s.shuffle_window,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.sequences
        mine = self.state_dict()
        for key in ("fingerprint", "seq_len", "seed", "shuffle_window"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"the checkpoint's data {key} is {state.get(key)!r} but this run's is "
                    f"{mine[key]!r} ({s.info.path}); resume with the same data and settings, "
                    f"or add 'data' to checkpoint.exclude_from_loading to start the data afresh"
                )
        self.consumed = int(state["consumed"])
        self._it = None
