"""Streaming, packed, data-parallel batches from webdataset shards, resumable to the sequence.

The order of training sequences is a pure function of (dataset fingerprint, seed, epoch)
(`data_pipeline.packing`): shards shuffled per epoch, documents packed with an EOS after each,
sequence i of an epoch cut at stream[i*L : i*L + L + overlap], sequences shuffled inside
windows. Several datasets can be mixed by weight (`data_pipeline.blend`). An objective
(`data_pipeline.objectives`) turns each sequence into the model's inputs, drawing its
randomness from (seed, global index), never from a generator's state.

A data-parallel rank r of R takes its contiguous slice of each global batch. The loader's whole
position is the number of global sequences consumed, an integer that does not depend on R or on
the number of worker processes: a run resumes exactly, at the same or another data-parallel
size, by jumping to the window that holds it (no replay from the start).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from data_pipeline.blend import BlendedSequences, open_datasets
from data_pipeline.dataset import DatasetInfo, Shard, check_vocab, read_shard_stream
from data_pipeline.errors import DataError
from data_pipeline.objectives import Causal, Objective, make_objective
from data_pipeline.packing import PackedSequences
from data_pipeline.workers import OrderedWorkers

__all__ = [
    "DatasetInfo",
    "DistributedBatches",
    "MicroBatchMaker",
    "PackedSequences",
    "Shard",
    "check_data",
    "make_batches",
    "open_datasets",
    "read_shard_stream",
    "with_defaults",
]

Sequences = PackedSequences | BlendedSequences


# Micro-batches are made in groups of about this many tokens per objective call: a numpy call
# costs microseconds whatever its size, so tiny micro-batches (the CPU configs' 4 x 32) made
# one at a time would spend their time in call overhead.
GROUP_TOKENS = 16384

Task = tuple[int, int]  # (first global sequence, count) of one micro-batch


class MicroBatchMaker:
    """Micro-batches, as numpy arrays, from ranges of global sequences: what a worker runs."""

    def __init__(self, sequences: Sequences, objective: Objective):
        self.sequences, self.objective = sequences, objective

    def __call__(self, tasks: list[Task]) -> list[dict[str, np.ndarray]]:
        index = np.concatenate([np.arange(s, s + c, dtype=np.int64) for s, c in tasks])
        rows = self.sequences.rows_at(index)
        batch = self.objective(rows, index)
        # The objective is row-wise, so one call on the group equals one call per micro-batch.
        cuts = np.cumsum([count for _, count in tasks])[:-1]
        parts = {key: np.split(value, cuts) for key, value in batch.items()}
        return [{key: parts[key][i] for key in batch} for i in range(len(tasks))]


class DistributedBatches:
    """This rank's micro-batches of each global batch, with a DP-size-free resumable position.

    A global batch is `micro_batch * dp_size * grad_accum` consecutive global sequences; rank r
    takes the r-th contiguous part and splits it into `grad_accum` micro-batches. This rank's
    micro-batches are made in groups of consecutive ones (one micro-batch per group once it
    holds GROUP_TOKENS or more). With `num_workers` > 0, worker processes make the groups
    (round robin, results in order, `prefetch` groups each ahead). Whatever was made ahead,
    the position is counted at step boundaries only and a new position discards it.
    """

    def __init__(
        self,
        sequences: Sequences,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        grad_accum: int = 1,
        objective: Objective | None = None,
        num_workers: int = 0,
        prefetch: int = 2,
        group_tokens: int = GROUP_TOKENS,
    ):
        if objective is None:
            objective = Causal(sequences.seq_len, sequences.info.eos_id)
        if (objective.raw_len, objective.overlap) != (sequences.seq_len, sequences.overlap):
            raise ValueError(
                f"the {objective.name} objective reads sequences of {objective.raw_len} + "
                f"{objective.overlap} tokens, the source cuts {sequences.seq_len} + "
                f"{sequences.overlap}; build the source for it (see make_batches)"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
        self.sequences, self.objective = sequences, objective
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size
        self.grad_accum = grad_accum
        self.global_batch = micro_batch * dp_size * grad_accum
        self.consumed = 0
        for source in getattr(sequences, "sources", [sequences]):
            source.dense = dp_size == 1 and num_workers <= 1
        self.maker = MicroBatchMaker(sequences, objective)
        self.workers = OrderedWorkers(self.maker, num_workers, prefetch) if num_workers else None
        self.group = max(1, group_tokens // (micro_batch * sequences.length))
        self._groups: Iterator[list[Task]] | None = None  # from `consumed`, once started
        self._ready: deque[dict[str, np.ndarray]] = deque()  # made ahead, in order

    @property
    def tokens_per_sequence(self) -> int:
        """Tokens the model reads per sequence: encoder plus decoder tokens for span
        corruption (throughput and MFU count both), else the sequence length."""
        return self.objective.seq_len + getattr(self.objective, "dec_len", 0)

    @property
    def epoch(self) -> float:
        """Passes over the data so far (over the most-repeated dataset of a blend)."""
        return self.sequences.epoch_of(self.consumed)

    def mixture(self) -> list[dict[str, Any]]:
        """The realised mixture so far: per dataset its path, weight, sequences served, fraction
        of all sequences, and epochs."""
        return self.sequences.mixture(self.consumed)

    def check_vocab(self, vocab_size: int) -> None:
        """DataError unless every id the data holds or the objective writes is below the
        model's `vocab_size` (reads token_counts.npz; no shard)."""
        for info in self.sequences.infos:
            check_vocab(info, vocab_size, self.objective.emitted_ids())

    def _tasks(self, consumed: int) -> Iterator[list[Task]]:
        """This rank's micro-batches from `consumed` on, in groups of 1, 2, 4 ... up to
        `self.group` (a loader that is rewound often, as for evaluation, makes little ahead)."""
        per_rank = self.micro_batch * self.grad_accum
        group: list[Task] = []
        size = 1
        while True:
            base = consumed + self.dp_rank * per_rank
            for m in range(self.grad_accum):
                group.append((base + m * self.micro_batch, self.micro_batch))
                if len(group) == size:
                    yield group
                    group, size = [], min(2 * size, self.group)
            consumed += self.global_batch

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for the next optimizer step: `grad_accum` dicts of named
        tensors that the model takes as keyword arguments (keys: see data_pipeline.objectives).
        """
        if self._groups is None:
            self._groups = self._tasks(self.consumed)
            self._ready.clear()
            if self.workers is not None:
                self.workers.start(self._groups)
        try:
            while len(self._ready) < self.grad_accum:
                if self.workers is not None:
                    self._ready.extend(self.workers.next())
                else:
                    self._ready.extend(self.maker(next(self._groups)))
        except BaseException:
            # A failed group is gone from the task stream: restart it at `consumed` so that a
            # caller that goes on (or an interrupted one) stays at the right position.
            self._groups = None
            raise
        micro = [self._ready.popleft() for _ in range(self.grad_accum)]
        self.consumed += self.global_batch
        return [{k: torch.from_numpy(v) for k, v in batch.items()} for batch in micro]

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed": self.consumed,
            **self.sequences.identity(),
            "objective": self.objective.describe(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine, state = self.state_dict(), with_defaults(state)
        for key in ("fingerprint", "seq_len", "seed", "shuffle_window", "shuffle_run", "objective"):
            theirs = state.get(key)
            if theirs != mine[key]:
                raise DataError(
                    f"the checkpoint's data {key} is {theirs!r} but this run's is "
                    f"{mine[key]!r} ({', '.join(str(i.path) for i in self.sequences.infos)}); "
                    f"resume with the same data and settings, or add 'data' to "
                    f"checkpoint.exclude_from_loading to start the data afresh"
                )
        self.consumed = int(state["consumed"])
        self._groups = None  # what was made ahead belongs to the old position

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self.workers is not None:
            self.workers.close()
        self._groups = None


def with_defaults(state: Mapping[str, Any]) -> dict[str, Any]:
    """A saved loader state with the keys that states saved before them lack, at the value
    those runs had: shuffle_run 1 (single sequences were shuffled)."""
    return {"shuffle_run": 1, **state}


def _setting(data: Any, key: str, default: Any) -> Any:
    if isinstance(data, Mapping):
        return data.get(key, default)
    return getattr(data, key, default)


def make_batches(
    data: Any,
    split: str,
    seq_len: int,
    seed: int,
    micro_batch: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    grad_accum: int = 1,
    objective: str = "causal",
    shuffle: bool = True,
    vocab_size: int | None = None,
    num_workers: int | None = None,
    group_tokens: int = GROUP_TOKENS,
) -> DistributedBatches:
    """The loader of one split for this rank, from the run's `data` settings.

    `data` is the DataConfig section or a mapping with its keys (path, blend, shuffle_window,
    shuffle_run, document_mask, mask_prob, noise_density, mean_span, num_workers, prefetch).
    `shuffle=False` (validation) reads shards and sequences in order. With `vocab_size` (the
    model's embedding rows) the ids are checked up front against token_counts.npz and each
    shard on reading.
    `num_workers` overrides data.num_workers (0 suits a validation loader, which restarts at
    every evaluation and would discard what workers made ahead). `group_tokens`: see
    DistributedBatches.
    """
    pairs = open_datasets(_setting(data, "path", ""), _setting(data, "blend", ()) or ())
    obj = make_objective(
        objective,
        pairs[0][1],
        seq_len,
        seed,
        document_mask=_setting(data, "document_mask", False),
        mask_prob=_setting(data, "mask_prob", 0.15),
        noise_density=_setting(data, "noise_density", 0.15),
        mean_span=_setting(data, "mean_span", 3.0),
    )
    window = _setting(data, "shuffle_window", 1) if shuffle else 1
    run = _setting(data, "shuffle_run", 1) if shuffle else 1
    sources = [
        PackedSequences(
            info,
            split,
            obj.raw_len,
            seed,
            window,
            shuffle_shards=shuffle,
            shuffle_run=run,
            overlap=obj.overlap,
            vocab_limit=vocab_size,
        )
        for _, info in pairs
    ]
    if len(sources) == 1:
        sequences: Sequences = sources[0]
    else:
        sequences = BlendedSequences(sources, [w for w, _ in pairs])
    workers = _setting(data, "num_workers", 0) if num_workers is None else num_workers
    batches = DistributedBatches(
        sequences,
        micro_batch,
        dp_rank,
        dp_size,
        grad_accum,
        obj,
        num_workers=workers,
        prefetch=_setting(data, "prefetch", 2),
        group_tokens=group_tokens,
    )
    if vocab_size is not None:
        batches.check_vocab(vocab_size)
    return batches


def check_data(
    data: Any,
    seq_len: int,
    seed: int,
    objective: str = "causal",
    vocab_size: int | None = None,
    splits: tuple[str, ...] = ("train",),
) -> list[tuple[float, DatasetInfo]]:
    """Everything make_batches refuses (missing datasets or splits, too little data, special
    ids the objective lacks, ids beyond `vocab_size`, bad blends), checked from the metadata
    alone: no shard is read and no process started, so the trainer can call it before any
    process group exists. Returns (weight, dataset) of data.path or each data.blend entry."""
    for split in splits:
        make_batches(
            data,
            split,
            seq_len,
            seed,
            1,
            objective=objective,
            vocab_size=vocab_size,
            num_workers=0,
        )
    return open_datasets(_setting(data, "path", ""), _setting(data, "blend", ()) or ())
