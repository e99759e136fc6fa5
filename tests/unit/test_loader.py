"""The streaming loader: packing, data-parallel slicing, epochs, exact resume, bad data."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.errors import DataError
from data_pipeline.loader import DatasetInfo, DistributedBatches, PackedSequences, read_shard_stream
from data_pipeline.stats import unigram_loss

L = 16


def full_stream(info: DatasetInfo, split: str = "train", shards=None) -> np.ndarray:
    """Every document of the split followed by EOS, in manifest order (or the given shard
    order), read independently of the loader's range logic."""
    shards = info.split(split) if shards is None else shards
    return np.concatenate([read_shard_stream(s, info.eos_id) for s in shards])


def epoch_sequences(seqs: PackedSequences, epoch: int) -> list[bytes]:
    """The unshuffled sequences of an epoch: its shard order, packed, cut every L tokens."""
    stream = full_stream(seqs.info, seqs.split, seqs.shard_order(epoch))
    stream = stream.astype(np.int64)  # the dtype the loader's batches carry
    return [stream[i * L : i * L + L + 1].tobytes() for i in range(seqs.per_epoch)]


def as_keys(batches) -> list[bytes]:
    return [
        row.tobytes()
        for b in batches
        for row in np.concatenate([b["tokens"].numpy(), b["targets"].numpy()[:, -1:]], axis=1)
    ]


def rank_batches(seqs, dp, rank, steps, micro=2, accum=1, state=None):
    loader = DistributedBatches(seqs, micro, rank, dp, accum)
    if state is not None:
        loader.load_state_dict(state)
    out = [loader.next_step() for _ in range(steps)]
    return out, loader


def global_order(seqs, dp, steps, micro=2, accum=1, state=None) -> list[bytes]:
    """The global sequence order the dp ranks jointly consume (rank slices concatenated)."""
    per_rank = [rank_batches(seqs, dp, r, steps, micro, accum, state)[0] for r in range(dp)]
    order = []
    for step in range(steps):
        for r in range(dp):
            order += as_keys(per_rank[r][step])
    return order


def test_unshuffled_sequences_are_the_packed_stream(small_dataset):
    info = DatasetInfo(small_dataset)
    seqs = PackedSequences(info, "train", L, seed=0, shuffle_window=1, shuffle_shards=False)
    stream = full_stream(info)
    assert seqs.per_epoch == (len(stream) - 1) // L
    assert len(info.split("train")) > 3  # the test spans shard boundaries
    it = seqs.iter_from(0)
    for i in range(seqs.per_epoch):
        np.testing.assert_array_equal(next(it), stream[i * L : i * L + L + 1])
    # Documents are separated by exactly one EOS each.
    docs = sum(s.documents for s in info.split("train"))
    assert (stream == info.eos_id).sum() >= docs


def test_two_ranks_disjoint_and_union_is_the_data(small_dataset):
    info = DatasetInfo(small_dataset)
    seqs = PackedSequences(info, "train", L, seed=3, shuffle_window=64)
    micro, dp = 2, 2
    steps = seqs.per_epoch // (micro * dp)
    r0 = as_keys(b for step in rank_batches(seqs, dp, 0, steps, micro)[0] for b in step)
    r1 = as_keys(b for step in rank_batches(seqs, dp, 1, steps, micro)[0] for b in step)
    # Disjoint by position: together the ranks never serve a sequence more often than the epoch
    # holds it, and they serve all of it but the remainder that does not fill a global batch.
    epoch = epoch_sequences(seqs, 0)
    served = steps * micro * dp
    assert len(r0) == len(r1) == served // 2
    assert Counter(r0) + Counter(r1) <= Counter(epoch)
    assert sum((Counter(r0) + Counter(r1)).values()) == served
    leftover = Counter(epoch) - (Counter(r0) + Counter(r1))
    assert sum(leftover.values()) == seqs.per_epoch - served


def test_each_epoch_is_a_permutation_and_epochs_differ(small_dataset):
    info = DatasetInfo(small_dataset)
    seqs = PackedSequences(info, "train", L, seed=5, shuffle_window=7)  # not a divisor
    n = seqs.per_epoch
    it = seqs.iter_from(0)
    e0 = [next(it).astype(np.int64).tobytes() for _ in range(n)]
    e1 = [next(it).astype(np.int64).tobytes() for _ in range(n)]
    assert Counter(e0) == Counter(epoch_sequences(seqs, 0))
    assert Counter(e1) == Counter(epoch_sequences(seqs, 1))
    assert e0 != e1
    assert e0 != epoch_sequences(seqs, 0)  # sequences were shuffled, not only shards
    assert seqs.shard_order(0) != seqs.shard_order(1)


def test_order_depends_on_seed_only(small_dataset):
    info = DatasetInfo(small_dataset)
    a = PackedSequences(info, "train", L, seed=1, shuffle_window=32).iter_from(0)
    b = PackedSequences(info, "train", L, seed=1, shuffle_window=32).iter_from(0)
    c = PackedSequences(info, "train", L, seed=2, shuffle_window=32).iter_from(0)
    xa, xb, xc = ([next(it).astype(np.int64).tobytes() for _ in range(200)] for it in (a, b, c))
    assert xa == xb and xa != xc


def test_global_order_is_independent_of_dp_size(small_dataset):
    info = DatasetInfo(small_dataset)
    seqs = PackedSequences(info, "train", L, seed=7, shuffle_window=16)
    # Global batch of 8 sequences as dp=1 x micro 4 x accum 2, dp=2 x 4, dp=4 x 2.
    one = global_order(seqs, dp=1, steps=6, micro=4, accum=2)
    two = global_order(seqs, dp=2, steps=6, micro=4, accum=1)
    four = global_order(seqs, dp=4, steps=6, micro=2, accum=1)
    assert one == two == four


@pytest.mark.parametrize("dp_before,dp_after", [(2, 2), (4, 2), (2, 4)])
def test_resume_gives_the_same_stream(small_dataset, dp_before, dp_after):
    info = DatasetInfo(small_dataset)
    seqs = PackedSequences(info, "train", L, seed=11, shuffle_window=16)
    micro = {2: 4, 4: 2}  # a global batch of 8 at both sizes
    straight = global_order(seqs, dp_before, steps=40, micro=micro[dp_before])
    # Stop after 23 steps (mid-window, mid-epoch for this dataset) and resume in new loaders.
    _, stopped = rank_batches(seqs, dp_before, 0, 23, micro[dp_before])
    state = stopped.state_dict()
    fresh = PackedSequences(info, "train", L, seed=11, shuffle_window=16)
    resumed = global_order(fresh, dp_after, steps=17, micro=micro[dp_after], state=state)
    assert resumed == straight[23 * 8 :]
    # Negative control: a loader that did not restore its position replays the start.
    replay = global_order(fresh, dp_after, steps=17, micro=micro[dp_after])
    assert replay != straight[23 * 8 :]


def test_resume_across_epoch_boundary(small_dataset):
    info = DatasetInfo(small_dataset)
    seqs = PackedSequences(info, "train", L, seed=2, shuffle_window=8)
    steps = seqs.per_epoch // 8 + 5  # past the end of epoch 0
    straight = global_order(seqs, 2, steps=steps, micro=4)
    _, stopped = rank_batches(seqs, 2, 1, steps - 3, 4)
    resumed = global_order(seqs, 2, steps=3, micro=4, state=stopped.state_dict())
    assert resumed == straight[(steps - 3) * 8 :]
    assert stopped.consumed > seqs.per_epoch  # the stop was in epoch 1


@pytest.mark.parametrize(
    "key,value",
    [("fingerprint", "0" * 64), ("seq_len", L + 1), ("seed", 99), ("shuffle_window", 3)],
)
def test_state_from_other_data_is_rejected(small_dataset, key, value):
    info = DatasetInfo(small_dataset)
    loader = DistributedBatches(PackedSequences(info, "train", L, 0, 16), 2, 0, 1)
    state = {**loader.state_dict(), key: value}
    with pytest.raises(DataError, match=key):
        loader.load_state_dict(state)


def test_missing_dataset_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="pretrain-data build"):
        DatasetInfo(tmp_path / "nowhere")


def test_truncated_shard_is_reported(small_dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(small_dataset, copy)
    info = DatasetInfo(copy)
    shard = info.split("train")[1]
    data = Path(shard.path).read_bytes()
    Path(shard.path).write_bytes(data[: len(data) // 2])
    seqs = PackedSequences(info, "train", L, 0, 1, shuffle_shards=False)
    with pytest.raises(DataError, match=shard.path.name):
        for _ in seqs.iter_from(0):
            pass


def test_split_too_small_for_one_sequence(small_dataset):
    info = DatasetInfo(small_dataset)
    total = sum(s.stream_length for s in info.split("val"))
    with pytest.raises(DataError, match="seq_len"):
        PackedSequences(info, "val", total + 5, 0)


def test_unigram_loss_matches_direct_count(small_dataset):
    info = DatasetInfo(small_dataset)
    train = np.bincount(full_stream(info, "train"), minlength=info.vocab_size).astype(float)
    val = np.bincount(full_stream(info, "val"), minlength=info.vocab_size).astype(float)
    p = (train + 1) / (train.sum() + info.vocab_size)
    want = -(val * np.log(p)).sum() / val.sum()
    got = unigram_loss(info)
    assert got == pytest.approx(want, rel=1e-9)
    assert 0 < got < np.log(info.vocab_size)
