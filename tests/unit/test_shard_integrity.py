"""Shards are checked against the manifest where they are read: a rank's first read compares
the sha256 (corruption that keeps every id in range), the run's checks before any process
group compare sizes, and `pretrain-data inspect` refuses to show a changed shard."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_pipeline import cli
from data_pipeline.dataset import DatasetInfo, read_shard_stream
from data_pipeline.errors import DataError
from data_pipeline.packing import PackedSequences
from data_pipeline.shards import MANIFEST_FILE, OPTIONAL_COLUMNS


def _flip_middle_bit(shard: Path) -> None:
    """Flip the lowest bit of a byte near the middle of the shard: tar padding or token data,
    either way the size and the tar structure stay, only the bytes change."""
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def drop_index_columns(dataset: Path) -> None:
    """Make `dataset`'s manifest look like one written before range indexes existed."""
    path = dataset / MANIFEST_FILE
    pq.write_table(pq.read_table(path).drop_columns(list(OPTIONAL_COLUMNS)), path)


@pytest.fixture
def copy(small_dataset, tmp_path) -> Path:
    out = tmp_path / "ds"
    shutil.copytree(small_dataset, out)
    return out


def test_first_read_checks_the_sha256(copy):
    info = DatasetInfo(copy)
    shard = info.split("train")[0]
    _flip_middle_bit(shard.path)
    with pytest.raises(
        DataError, match=rf"{shard.path.name} is corrupt: sha256 .*pretrain-data verify"
    ):
        read_shard_stream(shard, info.eos_id, info.dtype, verify=True)
    read_shard_stream(shard, info.eos_id, info.dtype, verify=False)  # control: bytes parse
    # The loader reads a shard whole, with this check, only in datasets without a range index
    # (built before it existed); tests/unit/test_range_reads.py covers the indexed path.
    drop_index_columns(copy)
    packed = PackedSequences(DatasetInfo(copy), "train", 32, seed=0, shuffle_shards=False)
    with pytest.raises(DataError, match="is corrupt: sha256"):
        packed.rows(0, 1)  # the loader's path: the first read of the first shard


def test_sizes_are_checked_without_reading(copy):
    info = DatasetInfo(copy)
    info.check_sizes("val")
    shard = info.split("val")[0].path
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size - 512)
    with pytest.raises(DataError, match=rf"{shard.name} is truncated or corrupt: \d+ bytes"):
        info.check_sizes("val")
    shard.unlink()
    with pytest.raises(DataError, match=rf"cannot read shard .*{shard.name}"):
        info.check_sizes("val")


def test_inspect_refuses_a_changed_shard(copy, capsys):
    assert cli.main(["inspect", str(copy), "--samples", "1", "--tokens", "4"]) == 0
    capsys.readouterr()
    _flip_middle_bit(copy / "train" / "train-000000.tar")
    assert cli.main(["inspect", str(copy), "--samples", "1", "--tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "train/train-000000.tar is corrupt: sha256" in err and "pretrain-data verify" in err
