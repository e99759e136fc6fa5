"""The on-disk dataset: webdataset tar shards, manifest.parquet, dataset.json, and checks.

Layout (format_version 2)::

    <dataset>/
      dataset.json       format_version, fingerprint, dtype, tokenizer (file, sha256,
                         vocab_size, eos_id, pad_id, mask_id, sentinel_ids), settings, splits
                         (documents, tokens, shard list per split), skipped, sources
      manifest.parquet   one row per shard: split, shard, documents, tokens, sha256, bytes,
                         index_sha256, index_bytes (of the shard's range index; null in
                         datasets built before it)
      tokenizer.json
      token_counts.npz   "train" and "val": int64[vocab_size] id counts (no end-of-document)
      train/train-000000.tar ...
      train/train-000000.tar.idx ...  range index: document offsets, crc32 per 256-byte
                                      chunk (data_pipeline.shard_index)
      val/val-000000.tar ...

Each shard holds one sample per document, ``{"__key__": "%010d" % doc_index, "npy": ids}``,
where doc_index counts documents within the split across shards and ``ids`` are the
document's token ids without an end-of-document token (the loader adds it).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from data_pipeline.dataset import SHARD_FIX, check_digest, member_ids, shard_members
from data_pipeline.digest import file_digest, file_sha256, json_sha256
from data_pipeline.errors import DataError
from data_pipeline.shard_index import CHUNK_BYTES, check_index, write_index

# 2: the special-token ids in dataset.json's tokenizer entry, shard sizes in the manifest.
FORMAT_VERSION = 2
DATASET_JSON = "dataset.json"
MANIFEST_FILE = "manifest.parquet"
TOKENIZER_FILE = "tokenizer.json"
TOKEN_COUNTS_FILE = "token_counts.npz"
SPLITS = ("train", "val")
DTYPES = ("uint16", "uint32")
MANIFEST_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("shard", pa.string()),
        ("documents", pa.int64()),
        ("tokens", pa.int64()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("index_sha256", pa.string()),
        ("index_bytes", pa.int64()),
    ]
)
# Columns added after format 2 shipped: a manifest without them is read as having no index.
OPTIONAL_COLUMNS = ("index_sha256", "index_bytes")
# A fixed member mtime makes the tar bytes, and so the shard sha256 and the fingerprint,
# depend only on the tokens: rebuilding the same inputs gives byte-identical shards.
TAR_MTIME = 0
DATASET_JSON_KEYS = (
    "format_version",
    "fingerprint",
    "dtype",
    "tokenizer",
    "sources",
    "settings",
    "splits",
    "skipped",
    "sources_sha256",
)
TOKENIZER_KEYS = ("file", "sha256", "vocab_size", "eos_id", "pad_id", "mask_id", "sentinel_ids")


@dataclass(frozen=True)
class ShardRecord:
    """One manifest row."""

    split: str
    shard: str
    documents: int
    tokens: int
    sha256: str
    bytes: int
    index_sha256: str | None = None
    index_bytes: int | None = None


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` checked."""

    fingerprint: str
    shards: int
    shard_bytes: int
    documents: int
    tokens: int
    vocab_size: int


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    """Shard path relative to the dataset directory, e.g. ``train/train-000003.tar``."""
    return f"{split}/{split}-{index:06d}.tar"


def sample_key(doc_index: int) -> str:
    """The webdataset ``__key__`` of a document: its index within the split."""
    return f"{doc_index:010d}"


class SplitWriter:
    """Writes one split's documents, in order, into tar shards of about ``shard_tokens``.

    A new shard starts once the current one holds ``shard_tokens`` tokens or more, so
    shards end on document boundaries and no shard is empty.
    """

    def __init__(self, root: Path, split: str, shard_tokens: int, dtype: np.dtype) -> None:
        self.root = Path(root)
        self.split = split
        self.shard_tokens = shard_tokens
        self.dtype = np.dtype(dtype)
        self.documents = 0
        self.tokens = 0
        self.records: list[ShardRecord] = []
        self._handle: io.BufferedWriter | None = None
        self._writer: wds.TarWriter | None = None
        self._shard_documents = 0
        self._shard_tokens = 0

    def add(self, ids: np.ndarray) -> None:
        """Append one document's token ids (non-empty, of this dataset's dtype)."""
        if ids.dtype != self.dtype or ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"expected a non-empty 1-d {self.dtype} array, got {ids!r}")
        if self._writer is None:
            self._open_shard()
        self._writer.write({"__key__": sample_key(self.documents), "npy": ids})
        self.documents += 1
        self.tokens += ids.size
        self._shard_documents += 1
        self._shard_tokens += ids.size
        if self._shard_tokens >= self.shard_tokens:
            self._close_shard()

    def close(self) -> list[ShardRecord]:
        """Finish the last shard; returns one record per shard written."""
        if self._writer is not None:
            self._close_shard()
        return self.records

    def _open_shard(self) -> None:
        name = shard_name(self.split, len(self.records))
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        # Our own file handle rather than a path string: webdataset would route a string
        # through gopen, which treats some paths as URLs or pipes.
        self._handle = path.open("wb")
        self._writer = wds.TarWriter(self._handle, mtime=TAR_MTIME)

    def _close_shard(self) -> None:
        self._writer.close()
        self._handle.close()
        name = shard_name(self.split, len(self.records))
        # One read of the shard just written (bounded by shard_tokens) gives its sha256 and
        # the range index, parsed from the bytes on disk rather than from what was meant.
        data = (self.root / name).read_bytes()
        index = write_index(self.root / name, data)
        record = ShardRecord(
            split=self.split,
            shard=name,
            documents=self._shard_documents,
            tokens=self._shard_tokens,
            sha256=hashlib.sha256(data).hexdigest(),
            bytes=len(data),
            index_sha256=index[1],
            index_bytes=index[0],
        )
        self.records.append(record)
        self._writer = self._handle = None
        self._shard_documents = self._shard_tokens = 0


def iter_shard(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, ids)`` for each document of one shard, in order: a view of the loader's
    parser (``dataset.shard_members``), the ids read-only views of the shard's bytes."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read shard {path} ({e}); {SHARD_FIX}") from None
    for member in shard_members(data, path):
        yield member.key, member_ids(data, member)


def write_manifest(path: Path, records: list[ShardRecord]) -> None:
    """manifest.parquet: one row per shard."""
    table = pa.Table.from_pylist([asdict(r) for r in records], schema=MANIFEST_SCHEMA)
    pq.write_table(table, path)


def read_manifest(dataset_dir: str | Path) -> list[ShardRecord]:
    """The manifest rows of a dataset, in order (train shards, then val shards)."""
    path = Path(dataset_dir) / MANIFEST_FILE
    try:
        # ParquetFile, not read_table: read_table imports pyarrow.dataset and pandas (about 1 s
        # of every rank's start-up, benchmarks/startup.py) to read this one small file.
        table = pq.ParquetFile(path).read()
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read {path}: {e}; the dataset is incomplete, rebuild it") from e
    missing = set(MANIFEST_SCHEMA.names) - set(OPTIONAL_COLUMNS) - set(table.column_names)
    if missing:
        raise DataError(f"{path} lacks columns {sorted(missing)}; rebuild the dataset")
    names = [k for k in MANIFEST_SCHEMA.names if k in table.column_names]
    return [ShardRecord(**{k: row[k] for k in names}) for row in table.to_pylist()]


def write_dataset_info(dataset_dir: Path, info: dict) -> None:
    """dataset.json, written last by the builder: its presence marks a finished dataset."""
    text = json.dumps(info, indent=2) + "\n"
    (Path(dataset_dir) / DATASET_JSON).write_text(text, encoding="utf-8")


def read_dataset_info(dataset_dir: str | Path) -> dict:
    """dataset.json, checked for the keys and values the loader relies on."""
    path = Path(dataset_dir) / DATASET_JSON
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(
            f"{dataset_dir} is not a dataset (no {DATASET_JSON}); "
            f"build one with pretrain-data build --out {dataset_dir}"
        ) from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}; rebuild the dataset") from e
    _check_dataset_info(info, path)
    return info


def _check_dataset_info(info: object, path: Path) -> None:
    if not isinstance(info, dict):
        raise DataError(f"{path} does not hold a JSON object; rebuild the dataset")
    missing = [k for k in DATASET_JSON_KEYS if k not in info]
    if missing:
        raise DataError(f"{path} lacks keys {missing}; rebuild the dataset")
    if info["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {info['format_version']!r}, this code reads "
            f"{FORMAT_VERSION}; rebuild the dataset with this version of pretrain-data"
        )
    if info["dtype"] not in DTYPES:
        raise DataError(f"{path} has dtype {info['dtype']!r}, expected one of {DTYPES}")
    if sorted(info["splits"]) != sorted(SPLITS):
        raise DataError(f"{path} has splits {sorted(info['splits'])}, expected {list(SPLITS)}")
    tokenizer = info["tokenizer"]
    missing = [k for k in TOKENIZER_KEYS if not isinstance(tokenizer, dict) or k not in tokenizer]
    if missing:
        raise DataError(f"{path} tokenizer entry lacks {missing}; rebuild the dataset")


def load_token_counts(dataset_dir: str | Path) -> dict[str, np.ndarray]:
    """Per-split int64 counts of each token id (end-of-document tokens not counted)."""
    path = Path(dataset_dir) / TOKEN_COUNTS_FILE
    try:
        with np.load(path) as counts:
            return {split: counts[split] for split in SPLITS}
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}; rebuild the dataset") from e


def fingerprint(
    tokenizer_sha256: str, sources_sha256: str, settings: dict, records: list[ShardRecord]
) -> str:
    """The dataset's identity: a sha256 over everything that determines its content.

    It covers the tokenizer bytes, the source content (sizes and sha256 of each file, in
    order, but not their paths, see ``sources.sources_sha256``), the settings, and every
    shard's sha256. Source content hashes rather than mtimes: touching or copying a file
    does not change the data, and hashing the ~11-30 MB stdlib takes well under a second.
    """
    return json_sha256(
        {
            "format_version": FORMAT_VERSION,
            "tokenizer_sha256": tokenizer_sha256,
            "sources_sha256": sources_sha256,
            "settings": settings,
            "shards": [[r.split, r.shard, r.sha256] for r in records],
        }
    )


def check_complete(dataset_dir: str | Path) -> tuple[dict, list[ShardRecord]]:
    """Check a dataset is whole and self-consistent without re-hashing the shards.

    Returns (dataset.json, manifest rows). Cheap enough to run before every reuse.
    """
    root = Path(dataset_dir)
    info = read_dataset_info(root)
    records = read_manifest(root)
    _check_tokenizer_file(root, info)
    for split in SPLITS:
        _check_split(root, info, split, [r for r in records if r.split == split])
    _check_token_counts(root, info)
    expected = fingerprint(
        info["tokenizer"]["sha256"], info["sources_sha256"], info["settings"], records
    )
    if expected != info["fingerprint"]:
        raise DataError(
            f"{root / DATASET_JSON} fingerprint does not match its manifest "
            f"({info['fingerprint'][:12]} != {expected[:12]}); rebuild the dataset"
        )
    return info, records


def _check_tokenizer_file(root: Path, info: dict) -> None:
    path = root / info["tokenizer"].get("file", TOKENIZER_FILE)
    actual = file_sha256(path)
    if actual != info["tokenizer"]["sha256"]:
        raise DataError(
            f"{path} has sha256 {actual[:12]}, dataset.json expects "
            f"{info['tokenizer']['sha256'][:12]}; restore the file or rebuild the dataset"
        )


def _check_split(root: Path, info: dict, split: str, records: list[ShardRecord]) -> None:
    entry = info["splits"][split]
    if [r.shard for r in records] != entry["shards"]:
        raise DataError(
            f"{root / MANIFEST_FILE} and {DATASET_JSON} list different {split} shards; "
            f"rebuild the dataset"
        )
    for key in ("documents", "tokens"):
        total = sum(getattr(r, key) for r in records)
        if total != entry[key]:
            raise DataError(
                f"{split} {key}: manifest sums to {total}, {DATASET_JSON} says {entry[key]}; "
                f"rebuild the dataset"
            )
    for record in records:
        if not (root / record.shard).is_file():
            raise DataError(
                f"shard {record.shard} is missing from {root}; restore it or rebuild the dataset"
            )


def _check_token_counts(root: Path, info: dict) -> None:
    counts = load_token_counts(root)
    vocab_size = info["tokenizer"]["vocab_size"]
    for split in SPLITS:
        array = counts[split]
        if array.shape != (vocab_size,) or int(array.sum()) != info["splits"][split]["tokens"]:
            raise DataError(
                f"{root / TOKEN_COUNTS_FILE} {split} counts do not match {DATASET_JSON} "
                f"(shape {array.shape}, sum {int(array.sum())}); rebuild the dataset"
            )


def verify(dataset_dir: str | Path) -> VerifyReport:
    """Check everything ``check_complete`` checks, then read every shard in full.

    Each shard must have the size and sha256 the manifest records, hold the documents and
    tokens it lists, in the dataset's dtype, and only ids below the vocabulary size. Raises
    DataError naming the first shard (and document) that does not.
    """
    root = Path(dataset_dir)
    info, records = check_complete(root)
    vocab_size = int(info["tokenizer"]["vocab_size"])
    dtype = np.dtype(info["dtype"])
    total_bytes = documents = tokens = 0
    for record in records:
        path = root / record.shard
        size, actual = file_digest(path)
        check_digest(path, size, actual, record.bytes, record.sha256)
        shard_documents, shard_tokens = _check_shard_ids(path, record, dtype, vocab_size)
        if (shard_documents, shard_tokens) != (record.documents, record.tokens):
            raise DataError(
                f"shard {record.shard} in {root} holds {shard_documents} documents and "
                f"{shard_tokens} tokens, the manifest says {record.documents} and "
                f"{record.tokens}; rebuild the dataset"
            )
        if record.index_sha256 is not None:
            check_index(path, record.index_sha256, record.index_bytes)
        total_bytes += size
        documents += shard_documents
        tokens += shard_tokens
    return VerifyReport(
        info["fingerprint"], len(records), total_bytes, documents, tokens, vocab_size
    )


def _check_shard_ids(
    path: Path, record: ShardRecord, dtype: np.dtype, vocab_size: int
) -> tuple[int, int]:
    """(documents, tokens) of one shard, after checking each document's dtype and ids."""
    documents = tokens = 0
    for key, ids in iter_shard(path):
        if ids.dtype != dtype or ids.ndim != 1:
            raise DataError(
                f"shard {record.shard}, document {key}: a {ids.ndim}-d {ids.dtype} array, "
                f"the dataset's dtype is {dtype}; rebuild the dataset"
            )
        # Unsigned ids, so only the maximum can be out of range.
        if ids.size and int(ids.max()) >= vocab_size:
            raise DataError(
                f"shard {record.shard}, document {key}: token id {int(ids.max())} is not below "
                f"the vocabulary size {vocab_size}; the shard was written with another "
                f"tokenizer: rebuild (or re-import) the dataset with the right tokenizer.json"
            )
        documents += 1
        tokens += ids.size
    return documents, tokens


def add_range_indexes(dataset_dir: str | Path, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Write the range index of every shard of a dataset built before indexes existed, and
    its manifest columns, so ranks read only their byte ranges; returns the shards indexed.
    Each shard is first checked against the manifest's size and sha256. The fingerprint does
    not change: it covers the shards, and an index is a function of its shard."""
    root = Path(dataset_dir)
    records = read_manifest(root)
    updated = []
    for record in records:
        path = root / record.shard
        data = path.read_bytes()
        check_digest(path, len(data), hashlib.sha256(data).hexdigest(), record.bytes,
                     record.sha256)  # fmt: skip
        size, sha256 = write_index(path, data, chunk_bytes)
        updated.append(replace(record, index_sha256=sha256, index_bytes=size))
    write_manifest(root / MANIFEST_FILE, updated)
    return len(updated)
