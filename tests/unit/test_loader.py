"""The streaming loader: packing, data-parallel slicing, epochs, worker processes, exact
resume for every objective and for blends, bad data."""

from __future__ import annotations

import io
import math
import os
import shutil
import signal
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from synthetic_data import FIRST_ID, random_docs, serial_docs, write_dataset

from data_pipeline.errors import DataError
from data_pipeline.loader import (
    DatasetInfo,
    DistributedBatches,
    PackedSequences,
    check_data,
    make_batches,
)
from data_pipeline.objectives import span_lengths
from data_pipeline.stats import unigram_loss

L = 16


def tar_documents(path) -> list[np.ndarray]:
    """A shard's documents read with the standard library's tarfile and numpy's .npy reader,
    member by member: independent of the loader's reader (read_shard_stream)."""
    with tarfile.open(path, "r") as tar:
        return [np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers()]


def full_stream(info: DatasetInfo, split: str = "train", shards=None) -> np.ndarray:
    """Every document of the split followed by EOS, in manifest order (or the given shard
    order), read independently of the loader."""
    shards = info.split(split) if shards is None else shards
    eos = np.array([info.eos_id])
    return np.concatenate(
        [part for s in shards for doc in tar_documents(s.path) for part in (doc, eos)]
    ).astype(info.dtype)


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
    rows = seqs.rows(0, seqs.per_epoch)
    for i in range(seqs.per_epoch):
        np.testing.assert_array_equal(rows[i], stream[i * L : i * L + L + 1])
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
    e0, e1 = ([r.astype(np.int64).tobytes() for r in seqs.rows(e * n, n)] for e in (0, 1))
    assert Counter(e0) == Counter(epoch_sequences(seqs, 0))
    assert Counter(e1) == Counter(epoch_sequences(seqs, 1))
    assert e0 != e1
    assert e0 != epoch_sequences(seqs, 0)  # sequences were shuffled, not only shards
    assert seqs.shard_order(0) != seqs.shard_order(1)


def test_shuffle_runs_keep_adjacent_sequences_together(small_dataset):
    """data.shuffle_run=4 moves runs of 4 adjacent sequences, each in order, inside each
    window; an epoch is still a permutation of the packed sequences. With run 1 the order is
    the one runs left alone: one rng.permutation per window drawn from (seed, epoch,
    window + 1), rebuilt here from the unshuffled sequences."""
    info = DatasetInfo(small_dataset)
    window, run = 16, 4
    runs = PackedSequences(info, "train", L, seed=5, shuffle_window=window, shuffle_run=run)
    n = runs.per_epoch
    plain = epoch_sequences(runs, 0)
    served = [r.astype(np.int64).tobytes() for r in runs.rows(0, n)]
    assert Counter(served) == Counter(plain)
    whole = n // window * window  # full windows; the last one is shorter
    for w in range(0, whole, window):
        # Each aligned group of 4 served is a whole run of the epoch from the same window.
        runs_of_window = Counter(tuple(plain[j : j + run]) for j in range(w, w + window, run))
        groups = Counter(tuple(served[i : i + run]) for i in range(w, w + window, run))
        assert groups == runs_of_window, w
    assert served != plain  # the runs were shuffled

    single = PackedSequences(info, "train", L, seed=5, shuffle_window=window)
    expected = []
    for w in range(-(-n // window)):
        size = min(window, n - w * window)
        order = np.random.default_rng([5, 0, w + 1]).permutation(size)
        expected += [plain[w * window + int(k)] for k in order]
    assert [r.astype(np.int64).tobytes() for r in single.rows(0, n)] == expected


def test_the_config_sets_the_shuffle_run_of_training_only(small_dataset):
    """data.shuffle_run reaches the loader that make_batches builds from the run's config
    section (as pretrain.train builds it); a validation loader (shuffle=False) keeps order."""
    from pretrain.config import load_config

    data = load_config(None, [f"data.path={small_dataset}", "data.shuffle_window=64",
                              "data.shuffle_run=4"]).data  # fmt: skip
    train = make_batches(data, "train", L, 0, 2)
    assert train.state_dict()["shuffle_run"] == 4
    assert make_batches(data, "val", L, 0, 2, shuffle=False).state_dict()["shuffle_run"] == 1


def test_order_depends_on_seed_only(small_dataset):
    info = DatasetInfo(small_dataset)
    xa, xb, xc = (
        PackedSequences(info, "train", L, seed=s, shuffle_window=32).rows(0, 200).tobytes()
        for s in (1, 1, 2)
    )
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
    [
        ("fingerprint", "0" * 64),
        ("seq_len", L + 1),
        ("seed", 99),
        ("shuffle_window", 3),
        ("shuffle_run", 4),
    ],
)
def test_state_from_other_data_is_rejected(small_dataset, key, value):
    info = DatasetInfo(small_dataset)
    loader = DistributedBatches(PackedSequences(info, "train", L, 0, 16), 2, 0, 1)
    state = {**loader.state_dict(), key: value}
    with pytest.raises(DataError, match=key):
        loader.load_state_dict(state)


def test_a_state_from_before_shuffle_runs_resumes_as_run_1(small_dataset):
    """Loader states saved before data.shuffle_run existed lack the key: they shuffled single
    sequences, so they resume a run-1 loader and are refused by a run-4 one."""
    info = DatasetInfo(small_dataset)
    old = DistributedBatches(PackedSequences(info, "train", L, 0, 16), 2, 0, 1).state_dict()
    del old["shuffle_run"]
    loader = DistributedBatches(PackedSequences(info, "train", L, 0, 16), 2, 0, 1)
    loader.load_state_dict({**old, "consumed": 6})
    assert loader.consumed == 6
    runs = DistributedBatches(PackedSequences(info, "train", L, 0, 16, shuffle_run=4), 2, 0, 1)
    with pytest.raises(DataError, match="shuffle_run is 1 but this run's is 4"):
        runs.load_state_dict(old)


def test_missing_dataset_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="pretrain-data build"):
        DatasetInfo(tmp_path / "nowhere")


def test_training_reader_checks_the_format_version(tmp_path):
    """The loader reads dataset.json through the builder's checked reader: a dataset of
    another format version is refused with the fix, not read as if it were this one."""
    import json

    root = write_dataset(tmp_path / "ds", {"train": serial_docs(500, 0), "val": []}, 2000)
    DatasetInfo(root)  # reads as written
    meta = json.loads((root / "dataset.json").read_text())
    meta["format_version"] += 1
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="format_version.*rebuild the dataset"):
        DatasetInfo(root)


def test_truncated_shard_is_reported(small_dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(small_dataset, copy)
    info = DatasetInfo(copy)
    shard = info.split("train")[1]
    data = Path(shard.path).read_bytes()
    Path(shard.path).write_bytes(data[: len(data) // 2])
    seqs = PackedSequences(info, "train", L, 0, 1, shuffle_shards=False)
    with pytest.raises(DataError, match=shard.path.name):
        seqs.rows(0, seqs.per_epoch)


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


# --- worker processes, objectives, blending ----------------------------------------------------


@pytest.fixture(scope="module")
def serial_dataset(tmp_path_factory) -> Path:
    """~1,900 stream tokens in ~12 shards; every ordinary token occurs once in the split."""
    root = tmp_path_factory.mktemp("serial") / "ds"
    docs = {"train": serial_docs(1700, seed=0), "val": serial_docs(300, seed=1, first=2000)}
    return write_dataset(root, docs, vocab_size=4096, shard_tokens=150)


@pytest.fixture(scope="module")
def random_datasets(tmp_path_factory) -> tuple[Path, Path]:
    """Two datasets of random ordinary ids, sharing a tokenizer."""
    base = tmp_path_factory.mktemp("random")
    a = write_dataset(
        base / "a", {"train": random_docs(6000, 0, FIRST_ID, 4096)}, 4096, shard_tokens=700
    )
    b = write_dataset(
        base / "b", {"train": random_docs(4000, 1, FIRST_ID, 4096)}, 4096, shard_tokens=500
    )
    return a, b


def epoch_rows(seqs: PackedSequences, epoch: int, seq_len: int) -> list[bytes]:
    """The sequences of an epoch cut from its shard order's packed stream, read directly."""
    stream = full_stream(seqs.info, seqs.split, seqs.shard_order(epoch)).astype(np.int64)
    n = (len(stream) - 1) // seq_len
    return [stream[i * seq_len : i * seq_len + seq_len + 1].tobytes() for i in range(n)]


def test_workers_cover_every_sequence_once_per_epoch(serial_dataset):
    """4 data-parallel ranks with 2 worker processes each, over 2.5 epochs."""
    L, dp, micro, accum, seed = 8, 4, 2, 2, 3
    data = {"path": str(serial_dataset), "shuffle_window": 24, "num_workers": 2}
    # group_tokens=1: one micro-batch per worker task, so the workers alternate micro-batches.
    loaders = [
        make_batches(data, "train", L, seed, micro, rank, dp, accum, group_tokens=1)
        for rank in range(dp)
    ]
    assert all(len(x.workers._processes) == 0 for x in loaders)  # started on first use
    n = loaders[0].sequences.per_epoch
    steps = math.ceil(2.5 * n / loaders[0].global_batch)
    served = []
    try:
        for _ in range(steps):
            for loader in loaders:
                served += as_keys(loader.next_step())
        assert all(len(x.workers._processes) == 2 for x in loaders)
    finally:
        for loader in loaders:
            loader.close()
    assert len(served) == steps * loaders[0].global_batch >= 2.5 * n
    seqs = loaders[0].sequences
    for epoch in range(3):
        got = served[epoch * n : (epoch + 1) * n]
        expected = Counter(epoch_rows(seqs, epoch, L))
        assert len(set(got)) == len(got)  # nothing served twice within an epoch
        if len(got) == n:
            assert Counter(got) == expected  # ... and nothing skipped
        else:
            assert len(got) > n // 2 and not Counter(got) - expected  # the partial third epoch
    # The workers deliver the order the training process computes by itself, in groups of
    # many micro-batches per objective call (the default).
    alone = [
        make_batches({**data, "num_workers": 0}, "train", L, seed, micro, r, dp, accum)
        for r in range(dp)
    ]
    assert alone[0].group > 100
    same = [row for _ in range(steps) for x in alone for row in as_keys(x.next_step())]
    assert same == served


def objective_data(objective: str, datasets: tuple[Path, Path], blend: bool) -> dict:
    data = {"path": str(datasets[0]), "shuffle_window": 16}
    if blend:
        data["blend"] = [f"0.6 {datasets[0]}", f"0.4 {datasets[1]}"]
    data["document_mask"] = objective == "causal-doc"
    return data


def joint_stream(data, objective, dp, steps, micro, state=None) -> dict:
    """The batch dicts the dp ranks consume over `steps`, concatenated in global order."""
    name = objective.removesuffix("-doc")
    loaders = [make_batches(data, "train", 16, 5, micro, r, dp, objective=name) for r in range(dp)]
    parts: list[dict] = []
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    for _ in range(steps):
        for loader in loaders:
            parts += loader.next_step()
    for loader in loaders:
        loader.close()
    return {k: np.concatenate([p[k].numpy() for p in parts]) for k in parts[0]}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


OBJECTIVE_NAMES = ["causal", "causal-doc", "mlm", "span"]


@pytest.mark.parametrize("objective", OBJECTIVE_NAMES)
@pytest.mark.parametrize("blend", [False, True], ids=["single", "blend"])
@pytest.mark.parametrize("dp_before,dp_after", [(2, 2), (4, 2), (2, 4)])
def test_resume_is_exact_for_every_objective(
    random_datasets, objective, blend, dp_before, dp_after
):
    data = objective_data(objective, random_datasets, blend)
    micro = {2: 4, 4: 2}  # a global batch of 8 at both sizes
    straight = joint_stream(data, objective, dp_before, 30, micro[dp_before])
    name = objective.removesuffix("-doc")
    stopped = make_batches(data, "train", 16, 5, micro[dp_before], 1, dp_before, objective=name)
    for _ in range(19):
        stopped.next_step()
    state = stopped.state_dict()
    assert state["consumed"] == 19 * 8
    resumed = joint_stream(data, objective, dp_after, 11, micro[dp_after], state)
    tail = {k: v[19 * 8 :] for k, v in straight.items()}
    assert same(resumed, tail)
    # Negative control: without the state the new loaders replay the start.
    fresh = joint_stream(data, objective, dp_after, 11, micro[dp_after])
    assert not same(fresh, tail)


def test_batch_keys_and_shapes(random_datasets):
    shapes = {}
    for objective in OBJECTIVE_NAMES:
        data = objective_data(objective, random_datasets, blend=False)
        batch = joint_stream(data, objective, 1, 1, 3)
        shapes[objective] = {k: (tuple(v.shape), v.dtype.name) for k, v in batch.items()}
    i64 = "int64"
    assert shapes["causal"] == {"tokens": ((3, 16), i64), "targets": ((3, 16), i64)}
    assert shapes["causal-doc"] == {**shapes["causal"], "doc_ids": ((3, 16), i64)}
    assert shapes["mlm"] == {
        "tokens": ((3, 16), i64),
        "targets": ((3, 16), i64),
        "loss_mask": ((3, 16), "float32"),
        "padding_mask": ((3, 16), "bool"),
    }
    _, dec = span_lengths(16, 0.15, 3.0)
    assert shapes["span"] == {
        "enc_tokens": ((3, 16), i64),
        "dec_tokens": ((3, dec), i64),
        "targets": ((3, dec), i64),
        "loss_mask": ((3, dec), "float32"),
        "enc_padding_mask": ((3, 16), "bool"),
        "dec_padding_mask": ((3, dec), "bool"),
    }


def test_workers_resume_and_rewind(random_datasets):
    """The position is `consumed` at step boundaries whatever the workers prefetched: a state
    taken from a loader with workers resumes a loader without, and rewinding a loader with
    workers drops its prefetched batches."""
    data = objective_data("mlm", random_datasets, blend=True)

    def loader(workers):
        # Groups of 3 micro-batches: a group ends mid-step, and workers hold several steps.
        return make_batches(
            data, "train", 16, 5, 2, 0, 2, 2, "mlm", num_workers=workers, group_tokens=3 * 32
        )

    ref = loader(0)
    straight = [ref.next_step() for _ in range(8)]
    with_workers = loader(2)
    try:
        first = [with_workers.next_step() for _ in range(5)]
        state_at_2 = {**with_workers.state_dict(), "consumed": 2 * with_workers.global_batch}
        state_at_5 = with_workers.state_dict()
        with_workers.load_state_dict(state_at_2)  # rewind while batches are in flight
        rewound = [with_workers.next_step() for _ in range(3)]
    finally:
        with_workers.close()
    plain = loader(0)
    plain.load_state_dict(state_at_5)
    after = [plain.next_step() for _ in range(3)]

    def eq(xs, ys):
        return all(
            same(_np(a), _np(b))
            for x, y in zip(xs, ys, strict=True)
            for a, b in zip(x, y, strict=True)
        )

    assert eq(first, straight[:5]) and eq(rewound, straight[2:5]) and eq(after, straight[5:8])
    assert not eq(after, straight[2:5])  # negative control: the positions differ


def _np(batch: dict) -> dict:
    return {k: v.numpy() for k, v in batch.items()}


# --- bad data ------------------------------------------------------------------------------


def test_ids_beyond_the_model_vocabulary_are_refused(serial_dataset):
    info = DatasetInfo(serial_dataset)
    top = info.max_token_id()
    assert top == 2000 + 299  # the largest serial token of either split (val starts at 2000)
    data = {"path": str(serial_dataset)}
    make_batches(data, "train", 8, 0, 2, vocab_size=top + 1)  # fits exactly
    with pytest.raises(DataError, match=rf"id {top}.*model.vocab_size to at least {top + 1}"):
        make_batches(data, "train", 8, 0, 2, vocab_size=top)
    # MLM also writes random tokens from the whole tokenizer vocabulary.
    with pytest.raises(DataError, match="the objective emits id 4095"):
        make_batches(data, "train", 8, 0, 2, objective="mlm", vocab_size=top + 1)


def test_ids_beyond_the_limit_are_caught_per_shard(serial_dataset, tmp_path):
    """token_counts.npz can be wrong (a copied or edited dataset); the shards are checked as
    they are read."""
    info = DatasetInfo(serial_dataset)
    shards = info.split("train")
    limit = FIRST_ID + shards[0].tokens  # the second shard's tokens are all >= this
    seqs = PackedSequences(info, "train", 8, 0, 1, shuffle_shards=False, vocab_limit=limit)
    seqs.rows(0, 2)  # the first shard is fine
    with pytest.raises(DataError, match=rf"{shards[1].path.name} holds token id"):
        seqs.rows(0, seqs.per_epoch)
    ok = PackedSequences(info, "train", 8, 0, 1, shuffle_shards=False, vocab_limit=4096)
    ok.rows(0, ok.per_epoch)


def test_empty_split_is_refused(tmp_path):
    path = write_dataset(tmp_path / "ds", {"train": serial_docs(500, 0)}, 4096)
    make_batches({"path": str(path)}, "train", 8, 0, 2)
    with pytest.raises(DataError, match="no 'val' split.*--val-fraction"):
        make_batches({"path": str(path)}, "val", 8, 0, 2)


@pytest.mark.parametrize(
    "objective,missing,kw",
    [("mlm", "mask_id", {"mask_id": None}), ("span", "sentinel_ids", {"sentinel_ids": ()})],
)
def test_objective_without_its_special_ids(tmp_path, objective, missing, kw):
    path = write_dataset(tmp_path / "ds", {"train": serial_docs(500, 0)}, 4096, **kw)
    with pytest.raises(DataError, match=rf"{missing}.*rebuild it with the current `pretrain-data"):
        make_batches({"path": str(path)}, "train", 16, 0, 2, objective=objective)
    make_batches({"path": str(path)}, "train", 16, 0, 2)  # causal needs neither


def test_too_few_sentinels(tmp_path):
    path = write_dataset(
        tmp_path / "ds", {"train": serial_docs(3000, 0)}, 4096, sentinel_ids=(3, 4)
    )
    make_batches({"path": str(path)}, "train", 30, 0, 2, objective="span")  # 2 spans
    with pytest.raises(DataError, match="only 2 sentinel ids"):
        make_batches({"path": str(path)}, "train", 64, 0, 2, objective="span")


def test_corrupt_shard_is_reported_from_a_worker(serial_dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(serial_dataset, copy)
    shard = DatasetInfo(copy).split("train")[2]
    data = shard.path.read_bytes()
    shard.path.write_bytes(data[: len(data) // 2])
    loader = make_batches({"path": str(copy), "num_workers": 2}, "train", 8, 0, 4)
    try:
        with pytest.raises(DataError, match=shard.path.name):
            for _ in range(100):
                loader.next_step()
    finally:
        loader.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_position_survives_an_error(serial_dataset, tmp_path, workers):
    """After a read error the loader is still at the step that failed: once the shard is
    restored it serves what a loader that never failed serves from there."""
    copy = tmp_path / "ds"
    shutil.copytree(serial_dataset, copy)
    shard = DatasetInfo(copy).split("train")[3]
    good = shard.path.read_bytes()
    shard.path.write_bytes(good[: len(good) // 2])
    data = {"path": str(copy), "num_workers": workers, "shuffle_window": 8}
    loader = make_batches(data, "train", 8, 0, 4, group_tokens=8 * 9 * 4)
    try:
        with pytest.raises(DataError, match=shard.path.name):
            for _ in range(100):
                loader.next_step()
        failed_at = loader.consumed
        shard.path.write_bytes(good)
        after = [_np(b) for _ in range(5) for b in loader.next_step()]
    finally:
        loader.close()
    reference = make_batches({**data, "num_workers": 0}, "train", 8, 0, 4)
    reference.load_state_dict({**reference.state_dict(), "consumed": failed_at})
    expected = [_np(b) for _ in range(5) for b in reference.next_step()]
    assert all(same(a, b) for a, b in zip(after, expected, strict=True))
    assert failed_at > 0  # the error came mid-stream, not at the start


def test_a_dead_worker_is_reported(serial_dataset):
    data = {"path": str(serial_dataset), "num_workers": 2}
    loader = make_batches(data, "train", 8, 0, 2, group_tokens=1)
    try:
        loader.next_step()
        victim = loader.workers._processes[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(5)
        with pytest.raises(RuntimeError, match="worker 1 .* exited with code -9"):
            for _ in range(20):
                loader.next_step()
    finally:
        loader.close()


def test_state_from_another_objective_is_rejected(random_datasets):
    data = {"path": str(random_datasets[0])}
    causal = make_batches(data, "train", 16, 0, 2)
    mlm = make_batches(data, "train", 16, 0, 2, objective="mlm")
    with pytest.raises(DataError, match="objective"):
        mlm.load_state_dict(causal.state_dict())
    doc = make_batches({**data, "document_mask": True}, "train", 16, 0, 2)
    with pytest.raises(DataError, match="objective"):
        doc.load_state_dict(causal.state_dict())
    doc.load_state_dict(doc.state_dict())


def test_unknown_objective(random_datasets):
    with pytest.raises(DataError, match="unknown objective 'prefix'"):
        make_batches({"path": str(random_datasets[0])}, "train", 16, 0, 2, objective="prefix")


def test_check_data_refuses_up_front_without_reading_shards(tmp_path, random_datasets):
    """check_data is what the trainer runs before process groups exist: metadata only."""
    no_mask = write_dataset(tmp_path / "m", {"train": serial_docs(500, 0)}, 4096, mask_id=None)
    empty_shards = tmp_path / "copy"
    shutil.copytree(no_mask, empty_shards)
    for shard in DatasetInfo(empty_shards).split("train"):
        shard.path.write_bytes(b"")  # reading any shard would fail
    data = {"path": str(empty_shards)}
    pairs = check_data(data, 16, 0, vocab_size=4096)
    assert [(w, i.path) for w, i in pairs] == [(1.0, empty_shards)]
    with pytest.raises(DataError, match="mask_id"):
        check_data(data, 16, 0, objective="mlm")
    with pytest.raises(DataError, match="model.vocab_size"):
        check_data(data, 16, 0, vocab_size=500)
    with pytest.raises(DataError, match="no 'val' split"):
        check_data(data, 16, 0, splits=("train", "val"))
    blend = {"blend": [f"1 {random_datasets[0]}", f"3 {random_datasets[1]}"]}
    assert [w for w, _ in check_data(blend, 16, 0, "span", 4096)] == [1.0, 3.0]
