"""A shard's range index: where each document's token ids lie in the shard, and a crc32 per
256-byte chunk of the shard's bytes.

It is what lets a data-parallel rank read only the byte ranges that hold its own sequences
(``data_pipeline.range_reads``) and still check what it read: a whole-shard sha256 can only be
checked by reading the whole shard, a chunk's crc32 by reading the chunk. The design is HDFS's
(a CRC32C per 512 bytes, verified by the client for the chunks a positional read touches):
crc32 detects every burst error up to 32 bits and any other corruption with probability
1 - 2**-32; here at 4 bytes per 256 (1.6% of the shard), see CHUNK_BYTES. The whole-shard
sha256 in the manifest stays what `pretrain-data verify` and `inspect` check.

The file sits beside its shard (``train/train-000000.tar.idx``) and holds four .npy arrays in a
row: [chunk_bytes] int64, the byte offset of each document's first id int64[documents], each
document's id count int64[documents], and crc32 uint32[ceil(shard bytes / chunk_bytes)]. The
manifest records its sha256 and size, checked when a rank loads it.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.dataset import SHARD_FIX, Shard, check_digest, shard_members
from data_pipeline.errors import DataError

# A range read rounds out to whole chunks, about one chunk more than the range: at 256 bytes
# that is an eighth more for a 1k-token sequence of uint16 ids (2 KiB), so a rank serving a
# quarter of the sequences reads under 30% of the bytes; the checksums take 1.6% of the data.
CHUNK_BYTES = 256
SUFFIX = ".idx"


@dataclass(frozen=True)
class ShardIndex:
    chunk_bytes: int
    offsets: np.ndarray  # int64[documents]: byte offset of each document's first token id
    lengths: np.ndarray  # int64[documents]: token ids per document
    crc32: np.ndarray  # uint32[chunks]: zlib.crc32 of each chunk of the shard's bytes

    def same_as(self, other: ShardIndex) -> bool:
        return self.chunk_bytes == other.chunk_bytes and all(
            np.array_equal(a, b)
            for a, b in zip(
                (self.offsets, self.lengths, self.crc32),
                (other.offsets, other.lengths, other.crc32),
                strict=True,
            )
        )


def index_path(shard_path: str | Path) -> Path:
    return Path(f"{shard_path}{SUFFIX}")


def chunk_crc32(data: bytes | memoryview, chunk_bytes: int) -> np.ndarray:
    view = memoryview(data)
    return np.array(
        [zlib.crc32(view[i : i + chunk_bytes]) for i in range(0, len(view), chunk_bytes)],
        dtype=np.uint32,
    )


def build_index(data: bytes, path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> ShardIndex:
    """The index of a shard's bytes (parsed with the loader's own parser)."""
    members = shard_members(data, path)
    return ShardIndex(
        chunk_bytes,
        np.array([m.offset for m in members], dtype=np.int64),
        np.array([m.count for m in members], dtype=np.int64),
        chunk_crc32(data, chunk_bytes),
    )


def _encode(index: ShardIndex) -> bytes:
    out = io.BytesIO()
    for array in (np.array([index.chunk_bytes], dtype=np.int64), index.offsets, index.lengths):
        np.save(out, array, allow_pickle=False)
    np.save(out, index.crc32, allow_pickle=False)
    return out.getvalue()


def _decode(data: bytes, path: Path) -> ShardIndex:
    fp = io.BytesIO(data)
    try:
        chunk, offsets, lengths, crc = (np.load(fp, allow_pickle=False) for _ in range(4))
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read shard index {path} ({e}); {SHARD_FIX}") from None
    return ShardIndex(int(chunk[0]), offsets, lengths, crc)


def write_index(shard_path: Path, data: bytes, chunk_bytes: int = CHUNK_BYTES) -> tuple[int, str]:
    """Write the index of the shard whose bytes are `data`; returns its (size, sha256)."""
    encoded = _encode(build_index(data, shard_path, chunk_bytes))
    index_path(shard_path).write_bytes(encoded)
    return len(encoded), hashlib.sha256(encoded).hexdigest()


def load_index(shard: Shard) -> ShardIndex:
    """The index of a shard whose manifest row records one, checked against that row: its
    size and sha256, and that it describes the shard's documents, tokens and bytes."""
    path = index_path(shard.path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read shard index {path} ({e}); {SHARD_FIX}") from None
    check_digest(path, len(data), hashlib.sha256(data).hexdigest(), shard.index_bytes,
                 shard.index_sha256)  # fmt: skip
    index = _decode(data, path)
    chunks = -(-(shard.bytes or 0) // max(index.chunk_bytes, 1))
    if (
        index.chunk_bytes < 1
        or len(index.offsets) != shard.documents
        or int(index.lengths.sum()) != shard.tokens
        or len(index.crc32) != chunks
    ):
        raise DataError(
            f"shard index {path} does not describe shard {shard.path} as the manifest does "
            f"({shard.documents} documents, {shard.tokens} tokens, {shard.bytes} bytes); "
            f"{SHARD_FIX}"
        )
    return index


def check_index(shard_path: Path, sha256: str, size: int | None) -> None:
    """DataError unless the index beside a shard is the manifest's and matches the shard's
    bytes: what `pretrain-data verify` adds for indexed shards."""
    path = index_path(shard_path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read shard index {path} ({e}); {SHARD_FIX}") from None
    check_digest(path, len(data), hashlib.sha256(data).hexdigest(), size, sha256)
    stored = _decode(data, path)
    if not stored.same_as(build_index(shard_path.read_bytes(), shard_path, stored.chunk_bytes)):
        raise DataError(
            f"shard index {path} does not match shard {shard_path}; rebuild the dataset"
        )
