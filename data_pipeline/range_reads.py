"""Token ids of a shard's stream by position, read from disk only where asked.

A shard's stream is its documents, each followed by the end-of-document id. A data-parallel
rank needs 1/DP of the sequences of each shuffle window, scattered over the window; reading the
window (or the shard) whole would read the dataset DP times per epoch across the ranks.
``RangeReader`` reads, for the positions asked, only the 256-byte chunks that hold them (from
the shard's range index, ``data_pipeline.shard_index``), checks each chunk's crc32 the first
time it is read, and keeps the chunks it has read for the next request. Datasets built before
the index existed are read whole by ``WholeReader``, with the manifest's sha256, as before.

Both count the bytes they read from disk in ``bytes_read`` (benchmarks/dp_io.py reports it).
"""

from __future__ import annotations

import os
import zlib

import numpy as np

from data_pipeline.dataset import SHARD_FIX, Shard, check_digest, read_shard_stream
from data_pipeline.errors import DataError
from data_pipeline.shard_index import index_path, load_index


class WholeReader:
    """The stream of a shard without a range index: the shard read whole."""

    def __init__(self, shard: Shard, eos_id: int, dtype: np.dtype, verify: bool):
        self.shard = shard
        self.stream = read_shard_stream(shard, eos_id, dtype, verify=verify)
        self.bytes_read = shard.bytes if shard.bytes is not None else shard.path.stat().st_size

    def gather(self, positions: np.ndarray) -> np.ndarray:
        return self.stream[positions]

    def rows(self, starts: np.ndarray, length: int) -> np.ndarray:
        return self.stream[starts[:, None] + np.arange(length)]

    def prefetch(self, start: int, stop: int) -> None:
        pass  # read whole already


class RangeReader:
    """The stream of an indexed shard, read chunk by chunk as positions are asked for."""

    def __init__(self, shard: Shard, eos_id: int, dtype: np.dtype):
        self.shard, self.eos_id, self.dtype = shard, eos_id, np.dtype(dtype)
        self.index = load_index(shard)
        self.bytes_read = int(shard.index_bytes or 0)
        lengths = self.index.lengths
        self._starts = np.cumsum(lengths + 1) - (lengths + 1)  # stream position of each document
        try:
            self._file = open(shard.path, "rb", buffering=0)  # noqa: SIM115 (kept while cached)
        except OSError as e:
            raise DataError(f"cannot read shard {shard.path} ({e}); {SHARD_FIX}") from None
        check_digest(shard.path, os.fstat(self._file.fileno()).st_size, "", shard.bytes, None)
        if hasattr(os, "posix_fadvise"):
            # Reads here are exactly the ranges needed: the kernel's read-ahead would fetch the
            # neighbouring sequences, which belong to other ranks.
            os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        # Untouched pages of np.empty are never committed, so a rank reading a quarter of the
        # chunks holds about a quarter of the shard in memory.
        self._buffer = np.empty(shard.bytes, dtype=np.uint8)
        self._ids = self._buffer[: shard.bytes - shard.bytes % self.dtype.itemsize].view(dtype)
        self._loaded = np.zeros(len(self.index.crc32), dtype=bool)
        self._done = np.zeros(len(self._loaded) + 1, dtype=np.int64)  # prefix sums of _loaded
        # Chunks that hold no id (tar headers, padding) are never needed.
        size, chunk = self.dtype.itemsize, self.index.chunk_bytes
        ends = self.index.offsets + lengths * size
        holds = np.zeros(len(self._loaded) + 1, dtype=np.int64)
        np.add.at(holds, self.index.offsets // chunk, 1)
        np.add.at(holds, (ends - 1) // chunk + 1, -1)
        self._unneeded = np.cumsum(holds[:-1]) == 0
        self.stream: np.ndarray | None = None  # the whole stream, once every id is read
        if len(ends) and (self.index.offsets.min() < 0 or ends.max() > shard.bytes):
            raise DataError(
                f"shard index {index_path(shard.path)} points outside shard {shard.path} "
                f"({shard.bytes} bytes); {SHARD_FIX}"
            )

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """The ids at stream `positions` (any shape, each in [0, stream_length))."""
        if self.stream is not None:
            return self.stream[positions]
        doc = np.searchsorted(self._starts, positions, side="right") - 1
        within = positions - self._starts[doc]
        eos = within == self.index.lengths[doc]
        byte = self.index.offsets[doc] + within * self.dtype.itemsize
        self._load(byte[~eos])
        if self.stream is not None:  # that read completed it
            return self.stream[positions]
        ids = self._ids[np.where(eos, 0, byte // self.dtype.itemsize)]
        ids[eos] = self.eos_id
        return ids

    def rows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """The [len(starts), length] ids from each stream position in `starts` on. A row
        inside one document is one byte range (most rows: documents are longer than rows);
        the rest, which hold an end-of-document id, are gathered id by id."""
        if self.stream is not None:
            return self.stream[starts[:, None] + np.arange(length)]
        size = self.dtype.itemsize
        doc = np.searchsorted(self._starts, starts, side="right") - 1
        within = starts - self._starts[doc]
        plain = within + length <= self.index.lengths[doc]
        first = (self.index.offsets[doc] + within * size) // size  # in ids
        chunk = self.index.chunk_bytes
        lo, hi = first[plain] * size // chunk, ((first[plain] + length) * size - 1) // chunk
        if len(lo) and (self._done[hi + 1] - self._done[lo] <= hi - lo).any():
            need = np.zeros(len(self._loaded) + 1, dtype=np.int64)
            np.add.at(need, lo, 1)
            np.add.at(need, hi + 1, -1)
            self._load_chunks(np.flatnonzero(np.cumsum(need[:-1]) > 0))
            if self.stream is not None:  # that read completed it
                return self.stream[starts[:, None] + np.arange(length)]
        if plain.all():
            return self._ids[first[:, None] + np.arange(length)]
        out = np.empty((len(starts), length), dtype=self.dtype)
        out[plain] = self._ids[first[plain, None] + np.arange(length)]
        out[~plain] = self.gather(starts[~plain, None] + np.arange(length))
        return out

    def prefetch(self, start: int, stop: int) -> None:
        """Read stream positions [start, stop) in one pass: for a process that will serve
        all of them (DP=1), which would otherwise read them sequence by sequence."""
        if self.stream is not None or start >= stop:
            return
        size, chunk = self.dtype.itemsize, self.index.chunk_bytes
        doc = np.searchsorted(self._starts, [start, stop - 1], side="right") - 1
        within = np.minimum([start, stop - 1] - self._starts[doc], self.index.lengths[doc])
        lo, hi = (self.index.offsets[doc] + within * size) // chunk
        self._load_chunks(np.arange(lo, hi + 1))

    def _load(self, byte: np.ndarray) -> None:
        """Read and check the chunks holding `byte` (ids never straddle a chunk: document
        offsets and the chunk size are multiples of the id size, see open_reader)."""
        chunk = self.index.chunk_bytes
        need = np.zeros(len(self._loaded), dtype=bool)
        need[byte // chunk] = True
        self._load_chunks(np.flatnonzero(need))

    def _load_chunks(self, chunks: np.ndarray) -> None:
        """Read and check `chunks` (sorted chunk numbers) where not read yet."""
        chunk = self.index.chunk_bytes
        missing = chunks[~self._loaded[chunks]]
        if not len(missing):
            return
        cuts = np.flatnonzero(np.diff(missing) != 1) + 1
        for run in np.split(missing, cuts):
            start, stop = int(run[0]) * chunk, min((int(run[-1]) + 1) * chunk, len(self._buffer))
            self._read_into(start, stop)
            view = self._buffer.data  # the array's own buffer: a memoryview without a copy
            for c in range(int(run[0]), int(run[-1]) + 1):
                if zlib.crc32(view[c * chunk : (c + 1) * chunk]) != self.index.crc32[c]:
                    raise DataError(
                        f"shard {self.shard.path} is corrupt: bytes {c * chunk}..{(c + 1) * chunk}"
                        f" do not match their crc32 in {index_path(self.shard.path).name}; "
                        f"{SHARD_FIX}"
                    )
            self._loaded[run] = True
            self.bytes_read += stop - start
        self._done[1:] = np.cumsum(self._loaded)
        if (self._loaded | self._unneeded).all():
            # Every id is in memory (a rank that served most of the shard, e.g. at DP=1
            # after one pass): from here on rows are one slice of the stream, as when a
            # shard is read whole.
            self.stream = self._stream()
            self._buffer = self._ids = None  # the stream holds a copy
            self._file.close()

    def _stream(self) -> np.ndarray:
        lengths = self.index.lengths
        stream = np.full(int(lengths.sum()) + len(lengths), self.eos_id, dtype=self.dtype)
        first = self.index.offsets // self.dtype.itemsize
        for start, begin, n in zip(self._starts.tolist(), first.tolist(), lengths.tolist(),
                                   strict=True):  # fmt: skip
            stream[start : start + n] = self._ids[begin : begin + n]
        return stream

    def _read_into(self, start: int, stop: int) -> None:
        view = self._buffer.data  # the array's own buffer: a memoryview without a copy
        try:
            self._file.seek(start)
            while start < stop:
                n = self._file.readinto(view[start:stop])
                if not n:
                    raise OSError(f"end of file at byte {start}")
                start += n
        except OSError as e:
            raise DataError(f"cannot read shard {self.shard.path} ({e}); {SHARD_FIX}") from None


def open_reader(
    shard: Shard, eos_id: int, dtype: np.dtype, verify: bool
) -> RangeReader | WholeReader:
    """A range reader where the shard has an index, else a whole reader (`verify`: check the
    whole-shard sha256, which the caller does on its first read of the shard only)."""
    if shard.index_sha256 is not None and shard.bytes is not None:
        reader = RangeReader(shard, eos_id, dtype)
        # The writer puts every id whole inside one chunk at a multiple of its size (tar
        # members start at multiples of 512, .npy headers end at multiples of 64); a shard
        # laid out otherwise is read whole rather than id by id.
        size = np.dtype(dtype).itemsize
        if reader.index.chunk_bytes % size == 0 and not np.any(reader.index.offsets % size):
            return reader
    return WholeReader(shard, eos_id, dtype, verify)
