"""Import already-tokenized data into a dataset directory: Megatron-LM indexed datasets
(.bin/.idx pairs) and flat token files.

The result is an ordinary dataset (same shards, manifest, counts and fingerprint as
``build``), with the tokenizer.json the data was tokenized with, which gives the vocabulary
size and the special ids. Every id is checked against that vocabulary on the way in.

Megatron's .idx layout (megatron-core ``datasets/indexed_dataset.py``, ``_IndexWriter``),
little-endian::

    9 bytes    magic b"MMIDIDX\\x00\\x00"
    uint64     version, 1
    uint8      dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
               7 float32, 8 uint16
    uint64     S, the number of sequences
    uint64     D, the length of the document index (documents + 1)
    int32[S]   the length in tokens of each sequence
    int64[S]   the byte offset of each sequence in the .bin file
    int64[D]   the document index: document d is sequences doc[d] .. doc[d+1] - 1
    int8[S]    (multimodal datasets only) the mode of each sequence

A document's tokens are its sequences' tokens concatenated (several sequences per document
come from sentence splitting). Megatron's preprocessing appends the end-of-document id to
each document (--append-eod); our shards hold documents without it (the loader adds it), so
one trailing end-of-document id is removed from each document.

A flat file is a bare array of uint16 or uint32 ids (little-endian) in which documents are
separated by a given id, as nanoGPT-style ``.bin`` files are.
"""

from __future__ import annotations

import glob
import logging
import os
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.build import (
    DEFAULT_SHARD_TOKENS,
    DEFAULT_VAL_FRACTION,
    BuildResult,
    build_key,
    check_split_settings,
    given_tokenizer,
)
from data_pipeline.errors import DataError
from data_pipeline.shards import write_dataset_info
from data_pipeline.sources import source_digests, sources_sha256
from data_pipeline.tokenizer import Tokenizer
from data_pipeline.writer import DatasetWriter, check_out, progress_bar, reusable, staging

MEGATRON, FLAT = "megatron", "flat"
MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_VERSION = 1
MEGATRON_HEADER = struct.Struct("<9sQBQQ")
MEGATRON_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
FLAT_DTYPES = ("uint16", "uint32")
# Tokens scanned per step when splitting a flat file at its separators: memory stays flat.
FLAT_BLOCK_TOKENS = 1 << 24

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportSettings:
    """The settings that shape an imported dataset; stored as ``settings`` in dataset.json."""

    source_format: str
    # Flat files only: their dtype, and the id that separates documents. Megatron: None, and
    # eos_id is the trailing id removed from each document.
    source_dtype: str | None
    eos_id: int
    val_fraction: float
    shard_tokens: int
    seed: int


@dataclass
class ImportStats:
    """What the import read: counts, and the first example of each kind of skip."""

    files: int = 0
    documents: int = 0
    tokens: int = 0
    empty: int = 0
    eos_stripped: int = 0
    # Bytes of token data read so far, for the progress bar.
    input_bytes: int = 0
    first_empty: str | None = None

    def skip_empty(self, where: str) -> None:
        """Count a document with no tokens (after removing its end-of-document id)."""
        self.empty += 1
        if self.first_empty is None:
            self.first_empty = where

    def skipped(self) -> dict:
        """The ``skipped`` entry of dataset.json, in the shape ``build`` writes."""
        return {
            "empty": self.empty,
            "undecodable": 0,
            "undecodable_by_reason": {},
        }

    def summary(self) -> str:
        """One line for logs and errors."""
        line = f"{self.documents} documents, {self.tokens} tokens from {self.files} files"
        if self.empty:
            line += f"; skipped {self.empty} empty (first: {self.first_empty})"
        return line


def import_tokens(
    out: str | os.PathLike[str],
    *,
    tokenizer: str | os.PathLike[str],
    megatron: Sequence[str | os.PathLike[str]] = (),
    flat: Sequence[str | os.PathLike[str]] = (),
    dtype: str | None = None,
    eos_id: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    seed: int = 0,
    progress: bool = True,
) -> BuildResult:
    """Import Megatron ``.bin/.idx`` prefixes or flat token files into a dataset at ``out``.

    ``tokenizer`` is the tokenizer.json the data was made with ("bytes": the byte
    tokenizer). Flat files need their ``dtype`` and the ``eos_id`` that separates their
    documents; for Megatron data ``eos_id`` (default: the tokenizer's) is the trailing id
    removed from each document. Returns without work if ``out`` already holds this import.
    """
    start = time.perf_counter()
    out = Path(out).absolute()
    if tokenizer is None:
        raise DataError(
            "importing token ids needs the tokenizer they were made with; pass --tokenizer "
            "tokenizer.json (its vocabulary size and special ids go into the dataset)"
        )
    tok = given_tokenizer(tokenizer)
    source_format, inputs = _choose_format(megatron, flat)
    settings = _settings(source_format, tok, dtype, eos_id, val_fraction, shard_tokens, seed)
    stats = ImportStats()
    files, total, documents = _open_sources(inputs, settings, stats)
    check_out(out)
    source_digest = sources_sha256(files, source_digests(files))
    key = build_key(asdict(settings), source_digest, tok.sha256)
    existing = reusable(out, key)
    if existing is not None:
        log.info("%s already holds this import; nothing to do", out)
        return BuildResult(out, existing, reused=True, seconds=time.perf_counter() - start)
    with staging(out) as tmp:
        writer = DatasetWriter(
            tmp, tok, shard_tokens=shard_tokens, seed=seed, val_fraction=val_fraction
        )
        with progress_bar("importing", total, progress) as bar:
            checked = _converted(
                documents, tok.vocab_size, str(tokenizer), writer.dtype, stats, bar
            )
            writer.write(checked)
        records = writer.finish(stats.summary(), hint="check the input files and --eos-id")
        info = writer.info(
            records,
            settings=asdict(settings),
            skipped=stats.skipped(),
            sources=[str(f) for f in files],
            source_digest=source_digest,
            build_key=key,
            extra={"imported": {"eos_stripped": stats.eos_stripped}},
        )
        write_dataset_info(tmp, info)
    seconds = time.perf_counter() - start
    log.info("imported %s into %s in %.1f s", stats.summary(), out, seconds)
    return BuildResult(out, info, reused=False, seconds=seconds)


def _open_sources(
    inputs: list[str], settings: ImportSettings, stats: ImportStats
) -> tuple[list[Path], int, Iterator[tuple[str, np.ndarray]]]:
    """(source files, bytes of token data, a lazy stream of (where, ids) documents).

    Megatron indexes are read and checked here, before anything is written.
    """
    if settings.source_format == MEGATRON:
        prefixes = megatron_prefixes(inputs)
        files = [Path(p + suffix) for p in prefixes for suffix in (".idx", ".bin")]
        indexes = [read_megatron_index(p) for p in prefixes]
        total = sum(index.bin_path.stat().st_size for index in indexes)
        return files, total, _megatron_stream(indexes, settings.eos_id, stats)
    files = flat_files(inputs)
    total = sum(f.stat().st_size for f in files)
    dtype = np.dtype(settings.source_dtype)
    return files, total, _flat_stream(files, dtype, settings.eos_id, stats)


def _choose_format(
    megatron: Sequence[str | os.PathLike[str]], flat: Sequence[str | os.PathLike[str]]
) -> tuple[str, list[str]]:
    if bool(megatron) == bool(flat):
        raise DataError(
            "pass exactly one kind of input: --megatron PREFIX ... (Megatron-LM .bin/.idx "
            "pairs) or --flat FILE ... (bare token files)"
        )
    if megatron:
        return MEGATRON, [str(p) for p in megatron]
    return FLAT, [str(p) for p in flat]


def _settings(
    source_format: str,
    tok: Tokenizer,
    dtype: str | None,
    eos_id: int | None,
    val_fraction: float,
    shard_tokens: int,
    seed: int,
) -> ImportSettings:
    check_split_settings(val_fraction, shard_tokens, seed)
    if source_format == MEGATRON:
        if dtype is not None:
            raise DataError(
                f"--dtype {dtype} is for flat files; a Megatron .idx records its own dtype, "
                f"drop --dtype"
            )
        eos_id = tok.eos_id if eos_id is None else eos_id
    else:
        if dtype not in FLAT_DTYPES:
            raise DataError(
                f"flat token files need their dtype: pass --dtype with one of {FLAT_DTYPES}, "
                f"not {dtype!r}"
            )
        if eos_id is None:
            raise DataError(
                "flat token files need the id that separates their documents; pass "
                "--eos-id N (often the tokenizer's end-of-text id)"
            )
    if type(eos_id) is not int or eos_id < 0:
        raise DataError(f"--eos-id {eos_id!r} must be a non-negative token id")
    return ImportSettings(source_format, dtype, eos_id, val_fraction, shard_tokens, seed)


def megatron_prefixes(items: Sequence[str]) -> list[str]:
    """Each item is a PREFIX (or PREFIX.bin / PREFIX.idx, or a glob of them) naming a pair."""
    prefixes: list[str] = []
    for item in items:
        base = item[: -len(".bin")] if item.endswith((".bin", ".idx")) else item
        if glob.has_magic(base):
            found = sorted(p[: -len(".idx")] for p in glob.glob(base + ".idx", recursive=True))
            if not found:
                raise DataError(
                    f"--megatron {item!r} matches no .idx file; check the pattern (give the "
                    f"prefix, without .bin/.idx)"
                )
        else:
            found = [base]
        for prefix in found:
            for suffix in (".idx", ".bin"):
                if not Path(prefix + suffix).is_file():
                    raise DataError(
                        f"Megatron dataset {prefix}: {prefix + suffix} does not exist; pass "
                        f"the prefix of an existing .bin/.idx pair"
                    )
            prefix = os.path.abspath(prefix)
            if prefix not in prefixes:
                prefixes.append(prefix)
    return prefixes


def flat_files(items: Sequence[str]) -> list[Path]:
    """Files or globs, in the order given (a glob's matches sorted), without duplicates."""
    files: list[Path] = []
    for item in items:
        if glob.has_magic(item):
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))]
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise DataError(f"--flat {item!r} matches no file; check the pattern")
        else:
            matches = [Path(item)]
            if not matches[0].is_file():
                raise DataError(f"--flat {item!r} is not a file; pass token files or a glob")
        files.extend(m.absolute() for m in matches if m.absolute() not in files)
    return files


@dataclass(frozen=True)
class MegatronIndex:
    """A checked Megatron .idx file and where its .bin is."""

    prefix: str
    bin_path: Path
    dtype: np.dtype
    sequence_lengths: np.ndarray = field(repr=False)
    sequence_pointers: np.ndarray = field(repr=False)
    document_index: np.ndarray = field(repr=False)

    @property
    def documents(self) -> int:
        """Number of documents."""
        return len(self.document_index) - 1


def read_megatron_index(prefix: str) -> MegatronIndex:
    """Parse and check ``prefix.idx`` against ``prefix.bin``; DataError on any mismatch."""
    idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
    try:
        size = idx_path.stat().st_size
        with idx_path.open("rb") as handle:
            header = handle.read(MEGATRON_HEADER.size)
    except OSError as e:
        raise DataError(f"cannot read {idx_path}: {e.strerror}; check the path") from e
    bad = f"{idx_path} is not a Megatron-LM index"
    if len(header) < MEGATRON_HEADER.size:
        raise DataError(f"{bad}: {size} bytes is shorter than the header; re-create it")
    magic, version, code, sequences, entries = MEGATRON_HEADER.unpack(header)
    if magic != MEGATRON_MAGIC:
        raise DataError(f"{bad} (magic {magic!r}, expected {MEGATRON_MAGIC!r})")
    if version != MEGATRON_VERSION:
        raise DataError(f"{idx_path} has index version {version}; only version 1 is supported")
    if code not in MEGATRON_DTYPES or np.dtype(MEGATRON_DTYPES[code]).kind == "f":
        raise DataError(
            f"{idx_path} has dtype code {code}; token ids need an integer dtype (codes 1-5 and 8)"
        )
    dtype = np.dtype(MEGATRON_DTYPES[code])
    expected = MEGATRON_HEADER.size + 12 * sequences + 8 * entries
    if size == expected + sequences and sequences:
        raise DataError(
            f"{idx_path} is a multimodal Megatron dataset (it has sequence modes); only token "
            f"datasets can be imported"
        )
    if size != expected:
        raise DataError(
            f"{idx_path} is truncated or corrupt: {size} bytes, its header implies "
            f"{expected}; re-create the .idx"
        )
    # Memory-mapped, as Megatron reads it: the index of a large corpus runs to gigabytes.
    offset = MEGATRON_HEADER.size

    def array(kind: type, count: int, at: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=kind)
        return np.memmap(idx_path, dtype=kind, mode="r", offset=at, shape=(count,))

    lengths = array(np.int32, sequences, offset)
    pointers = array(np.int64, sequences, offset + 4 * sequences)
    documents = array(np.int64, entries, offset + 12 * sequences)
    index = MegatronIndex(prefix, bin_path, dtype, lengths, pointers, documents)
    _check_megatron_index(index, idx_path)
    return index


def _check_megatron_index(index: MegatronIndex, idx_path: Path) -> None:
    """The document index covers the sequences in order; the sequences lie inside .bin."""
    docs, lengths, pointers = index.document_index, index.sequence_lengths, index.sequence_pointers
    sequences = len(lengths)
    if len(docs) == 0 or docs[0] != 0 or docs[-1] != sequences or np.any(np.diff(docs) < 0):
        raise DataError(
            f"{idx_path} is corrupt: its document index does not run from 0 to the "
            f"{sequences} sequences in order; re-create the .idx"
        )
    try:
        size = index.bin_path.stat().st_size
    except OSError as e:
        raise DataError(f"cannot read {index.bin_path}: {e.strerror}; check the path") from e
    ends = pointers + lengths.astype(np.int64) * index.dtype.itemsize
    if np.any(lengths < 0) or np.any(pointers < 0) or np.any(pointers % index.dtype.itemsize):
        raise DataError(f"{idx_path} is corrupt: negative or misaligned sequences")
    if sequences and int(ends.max()) > size:
        raise DataError(
            f"{index.bin_path} is truncated: the index needs {int(ends.max())} bytes, the file "
            f"has {size}; re-create or re-copy the .bin"
        )


def _megatron_stream(
    indexes: Sequence[MegatronIndex], eos_id: int, stats: ImportStats
) -> Iterator[tuple[str, np.ndarray]]:
    """(where, ids) of every document, in the source dtype, trailing ``eos_id`` removed."""
    base = 0
    for index in indexes:
        stats.files += 1
        tokens = np.memmap(index.bin_path, dtype=index.dtype, mode="r")
        docs, lengths = index.document_index, index.sequence_lengths
        starts = index.sequence_pointers // index.dtype.itemsize
        for d in range(index.documents):
            first, last = int(docs[d]), int(docs[d + 1])
            pieces = [tokens[starts[s] : starts[s] + lengths[s]] for s in range(first, last)]
            ids = pieces[0] if len(pieces) == 1 else np.concatenate(pieces or [tokens[:0]])
            if ids.size and ids[-1] == eos_id:
                ids = ids[:-1]
                stats.eos_stripped += 1
            if last > first:
                end = index.sequence_pointers[last - 1] + lengths[last - 1] * index.dtype.itemsize
                stats.input_bytes = base + int(end)
            yield f"{index.prefix}.bin, document {d}", ids
        base += index.bin_path.stat().st_size
        del tokens


def _flat_stream(
    files: Sequence[Path], dtype: np.dtype, separator: int, stats: ImportStats
) -> Iterator[tuple[str, np.ndarray]]:
    """(where, ids) of every document of the flat files: the runs between separators."""
    base = 0
    little = dtype.newbyteorder("<")
    for path in files:
        stats.files += 1
        size = path.stat().st_size
        if size % little.itemsize:
            raise DataError(
                f"flat token file {path} has {size} bytes, not a multiple of {little.itemsize} "
                f"({dtype.name}): it is truncated or not {dtype.name}; check --dtype"
            )
        if size == 0:
            continue
        tokens = np.memmap(path, dtype=little, mode="r")
        document = 0
        start = 0  # first token of the current document
        for block in range(0, tokens.size, FLAT_BLOCK_TOKENS):
            chunk = tokens[block : block + FLAT_BLOCK_TOKENS]
            for stop in (np.flatnonzero(chunk == separator) + block).tolist():
                stats.input_bytes = base + stop * little.itemsize
                yield f"{path}, document {document}", tokens[start:stop]
                document += 1
                start = stop + 1
        if start < tokens.size:
            yield f"{path}, document {document}", tokens[start:]
        base += size
        stats.input_bytes = base
        del tokens


def _converted(
    documents: Iterator[tuple[str, np.ndarray]],
    vocab_size: int,
    tokenizer_name: str,
    dtype: np.dtype,
    stats: ImportStats,
    bar: tqdm,
) -> Iterator[np.ndarray]:
    """Each document checked against the vocabulary and copied into the dataset's dtype."""
    seen = 0
    for where, ids in documents:
        if ids.size == 0:
            stats.skip_empty(where)
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise DataError(
                f"{where}: token id {low if low < 0 else high} is outside the vocabulary of "
                f"{tokenizer_name} (ids 0..{vocab_size - 1}); pass the tokenizer.json the data "
                f"was tokenized with (and, for flat files, the right --dtype)"
            )
        yield np.asarray(ids, dtype=dtype)
        stats.documents += 1
        stats.tokens += ids.size
        if stats.documents % 1024 == 0:
            bar.update(stats.input_bytes - seen)
            seen = stats.input_bytes
            bar.set_postfix_str(f"docs={stats.documents:,} tokens={stats.tokens:,}", refresh=False)
    bar.update(stats.input_bytes - seen)
