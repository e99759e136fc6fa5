"""Range reads: a rank reads only the chunks that hold its sequences, checks each against the
shard's range index, and serves the same tokens as a whole-shard read; datasets without an
index are still read whole."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from test_loader import full_stream
from test_shard_integrity import drop_index_columns

from data_pipeline.dataset import DatasetInfo
from data_pipeline.errors import DataError
from data_pipeline.loader import make_batches
from data_pipeline.packing import PackedSequences
from data_pipeline.shard_index import index_path
from data_pipeline.shards import add_range_indexes, read_manifest, verify
from data_pipeline.writer import reusable

L = 32


@pytest.fixture
def copy(small_dataset, tmp_path) -> Path:
    out = tmp_path / "ds"
    shutil.copytree(small_dataset, out)
    return out


def payloads(shard: Path) -> list[tuple[int, int, int]]:
    """(file offset of the first id, id count, id size) of each document, found with the standard
    library's tarfile and numpy's .npy header reader, independently of the range index."""
    out = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            fp = io.BytesIO(tar.extractfile(m).read())
            np.lib.format.read_magic(fp)
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
            out.append((m.offset_data + fp.tell(), shape[0], dtype.itemsize))
    return out


def test_a_flipped_byte_is_caught_by_the_rank_that_reads_it(copy):
    info = DatasetInfo(copy)
    shard = info.split("train")[0]
    docs = payloads(shard.path)
    # A byte in the middle of the middle document, and the stream position of its token.
    k = len(docs) // 2
    offset, count, size = docs[k]
    byte = offset + count // 2 * size
    position = sum(n + 1 for _, n, _ in docs[:k]) + count // 2
    data = bytearray(shard.path.read_bytes())
    data[byte] ^= 0x01
    shard.path.write_bytes(bytes(data))

    packed = PackedSequences(info, "train", L, seed=0, shuffle_shards=False)
    assert position // L > 4  # sequences 0..1 lie in other chunks
    clean = packed.rows(0, 2)  # not this rank's bytes: read without complaint
    assert packed.bytes_read < shard.bytes // 4
    with pytest.raises(DataError, match=rf"shard \S*{shard.path.name} is corrupt: .*crc32"):
        packed.rows(position // L, 1)
    with pytest.raises(DataError, match=rf"{shard.path.name} is corrupt: sha256"):
        verify(copy)  # which reads everything
    data[byte] ^= 0x01  # restored: the same sequences read back, and verify passes
    shard.path.write_bytes(bytes(data))
    fresh = PackedSequences(DatasetInfo(copy), "train", L, seed=0, shuffle_shards=False)
    assert np.array_equal(fresh.rows(0, 2), clean)
    fresh.rows(position // L, 1)
    verify(copy)


def test_partial_reads_serve_the_tokens_of_the_tar(small_dataset):
    """Sequences read one at a time by fresh readers (each shard only partly read: rows
    inside a document, rows across documents and across shards) equal the stream built
    with tarfile; the loader tests cover shards read completely."""
    info = DatasetInfo(small_dataset)
    stream = full_stream(info).astype(np.int64)
    packed = PackedSequences(info, "train", L, seed=0, shuffle_shards=False)
    ends = np.cumsum([s.stream_length for s in info.split("train")])
    across = [int(e) // L for e in ends[:-1]]  # a row that runs into the next shard
    for i in [0, 1, 7, packed.per_epoch // 2, packed.per_epoch - 1, *across]:
        fresh = PackedSequences(info, "train", L, seed=0, shuffle_shards=False)
        got = fresh.rows(i, 1)[0]
        assert fresh.bytes_read < sum(s.bytes for s in info.split("train")) // 2
        assert np.array_equal(got, stream[i * L : i * L + L + 1]), i
    every = packed.rows_at(np.arange(packed.per_epoch)[::-1])  # all of them, one call
    want = np.lib.stride_tricks.sliding_window_view(stream, L + 1)[::L][: packed.per_epoch]
    assert np.array_equal(every[::-1], want)


def test_a_changed_index_is_refused(copy):
    info = DatasetInfo(copy)
    shard = info.split("val")[0]
    index = index_path(shard.path)
    data = bytearray(index.read_bytes())
    data[-1] ^= 0x01  # the last crc32
    index.write_bytes(bytes(data))
    packed = PackedSequences(info, "val", L, seed=0, shuffle_shards=False)
    with pytest.raises(DataError, match=rf"{index.name} is corrupt: sha256"):
        packed.rows(0, 1)
    with pytest.raises(DataError, match=rf"{index.name} is corrupt: sha256"):
        verify(copy)
    index.write_bytes(bytes(data[:-4]))
    with pytest.raises(DataError, match=rf"{index.name} is truncated or corrupt"):
        info.check_sizes("val")  # before any process group: a stat, no read


def test_old_datasets_read_whole_and_serve_the_same_sequences(copy, small_dataset):
    indexed = PackedSequences(DatasetInfo(small_dataset), "train", L, seed=3, shuffle_window=16)
    drop_index_columns(copy)
    for path in copy.glob("*/*.idx"):
        path.unlink()  # an old dataset has none: nothing may look for them
    old_info = DatasetInfo(copy)
    assert all(s.index_sha256 is None for s in old_info.split("train"))
    old = PackedSequences(old_info, "train", L, seed=3, shuffle_window=16)
    n = indexed.per_epoch + 40  # into the second epoch (another shard order)
    assert np.array_equal(indexed.rows(0, n), old.rows(0, n))
    # The old path reads every shard whole; the indexed one read each chunk once.
    sizes = sum(s.bytes for s in old_info.split("train"))
    assert old.bytes_read >= sizes
    assert indexed.bytes_read < old.bytes_read
    # A build with the same inputs replaces such a dataset rather than reusing it ...
    key = json.loads((copy / "dataset.json").read_text())["build_key"]
    assert reusable(Path(small_dataset), key) is not None
    assert reusable(copy, key) is None
    # ... and add_range_indexes upgrades it in place, fingerprint unchanged.
    before = DatasetInfo(copy).fingerprint
    assert add_range_indexes(copy) == len(read_manifest(copy))
    verify(copy)
    upgraded = PackedSequences(DatasetInfo(copy), "train", L, seed=3, shuffle_window=16)
    assert upgraded.info.fingerprint == before
    assert np.array_equal(upgraded.rows(5, 3), indexed.rows(5, 3))
    assert upgraded.bytes_read < sizes // 2


def test_ranks_read_a_share_of_the_bytes(small_dataset):
    """At a fixed global batch, each of 4 ranks reads a little over a quarter of what one rank
    reads alone (the chunks around its sequences and the shards' indexes), and the 4 ranks
    together serve exactly the sequences of the one."""

    def run(dp: int, rank: int):
        loader = make_batches({"path": small_dataset, "shuffle_window": 64}, "train", 1024, 0,
                              16 // dp, dp_rank=rank, dp_size=dp)  # fmt: skip
        rows = [loader.next_step()[0]["tokens"].numpy() for _ in range(6)]
        return rows, loader.sequences.bytes_read

    one, alone = run(1, 0)
    assert alone < 0.8 * sum(s.bytes for s in DatasetInfo(small_dataset).split("train"))
    ranks = [run(4, r) for r in range(4)]
    for step in range(6):
        assert np.array_equal(np.concatenate([r[0][step] for r in ranks]), one[step])
    shares = [r[1] / alone for r in ranks]
    assert all(0.2 < s < 0.35 for s in shares), shares


def test_shuffle_runs_cut_what_ranks_read_of_short_sequences(small_dataset):
    """Sequences of 128 tokens (258 bytes) read one by one cost about two 256-byte chunks
    each, so 4 ranks read well over a quarter of one rank's bytes each; with
    data.shuffle_run=8 each rank's sequences come in runs of 8 adjacent ones and each reads at
    most 30% of one rank's bytes (the issue's bound), serving the same global batches.
    (group_tokens=1: a loader makes no micro-batch ahead, so every rank reads exactly what
    the 30 steps serve.)"""

    def run(dp: int, rank: int, shuffle_run: int):
        settings = {"path": small_dataset, "shuffle_window": 64, "shuffle_run": shuffle_run}
        loader = make_batches(settings, "train", 128, 0, 32 // dp, dp_rank=rank, dp_size=dp,
                              group_tokens=1)  # fmt: skip
        rows = [loader.next_step()[0]["tokens"].numpy() for _ in range(30)]
        return rows, loader.sequences.bytes_read

    shares = {}
    for shuffle_run in (1, 8):
        one, alone = run(1, 0, shuffle_run)
        ranks = [run(4, r, shuffle_run) for r in range(4)]
        for step in range(30):
            assert np.array_equal(np.concatenate([r[0][step] for r in ranks]), one[step])
        shares[shuffle_run] = max(r[1] for r in ranks) / alone
    assert shares[8] <= 0.30, shares
    # Control: single sequences (what a loader that dropped data.shuffle_run would serve).
    assert shares[1] > 0.40, shares
