"""Writing a dataset directory, shared by ``build`` (text) and ``import`` (token files).

Documents arrive as token id arrays in corpus order. Each goes to the train or val split by a
hash of its index, into that split's tar shards, and into the split's token counts. The whole
directory is written in a staging directory beside the output and renamed into place only
when complete, so an error or a crash never leaves a half-written dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.errors import DataError
from data_pipeline.shards import (
    DATASET_JSON,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SPLITS,
    TOKEN_COUNTS_FILE,
    TOKENIZER_FILE,
    ShardRecord,
    SplitWriter,
    check_complete,
    fingerprint,
    token_dtype,
    write_manifest,
)
from data_pipeline.tokenizer import Tokenizer

# Token ids buffered before one np.bincount: one bincount per document would cost
# O(vocab_size) each time, which dominates for short documents and big vocabularies.
COUNT_FLUSH_TOKENS = 1 << 20

log = logging.getLogger(__name__)


class DatasetWriter:
    """Fills a staging directory with a tokenizer, shards, token counts and a manifest."""

    def __init__(
        self, root: Path, tok: Tokenizer, *, shard_tokens: int, seed: int, val_fraction: float
    ) -> None:
        self.root = root
        self.tok = tok
        self.dtype = token_dtype(tok.vocab_size)
        self.seed = seed
        self.val_fraction = val_fraction
        tok.save(root / TOKENIZER_FILE)
        self.splits = {s: SplitWriter(root, s, shard_tokens, self.dtype) for s in SPLITS}
        self.counters = {s: TokenCounter(tok.vocab_size) for s in SPLITS}

    def write(self, documents: Iterable[np.ndarray]) -> None:
        """Add every document (a non-empty id array of this dataset's dtype), in order."""
        for split, ids in assign_splits(documents, self.seed, self.val_fraction):
            self.splits[split].add(ids)
            self.counters[split].add(ids)

    def finish(
        self, what_was_read: str, hint: str = "check the input paths and --text-field"
    ) -> list[ShardRecord]:
        """Close the shards, write counts and manifest; returns the manifest rows.

        ``what_was_read`` (a summary of the inputs and skips) and ``hint`` go into the error
        raised when no document made it into the dataset.
        """
        records = [r for s in SPLITS for r in self.splits[s].close()]
        _check_splits(self.splits, what_was_read, hint)
        totals = {s: self.counters[s].totals() for s in SPLITS}
        np.savez(self.root / TOKEN_COUNTS_FILE, **totals)  # type: ignore[arg-type]
        write_manifest(self.root / MANIFEST_FILE, records)
        return records

    def info(
        self,
        records: list[ShardRecord],
        *,
        settings: dict,
        skipped: dict,
        sources: list[str],
        source_digest: str,
        build_key: str,
        tokenizer_extra: dict | None = None,
        extra: dict | None = None,
    ) -> dict:
        """dataset.json for what was written, fingerprint included."""
        info = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint(self.tok.sha256, source_digest, settings, records),
            "dtype": self.dtype.name,
            "tokenizer": {"file": TOKENIZER_FILE, **self.tok.describe(), **(tokenizer_extra or {})},
            "settings": settings,
            "splits": {s: _split_entry(self.splits[s]) for s in SPLITS},
            "skipped": skipped,
            **(extra or {}),
            "sources_sha256": source_digest,
            "build_key": build_key,
            "sources": sources,
        }
        return info


def in_val_split(seed: int, index: int, val_fraction: float) -> bool:
    """Whether document ``index`` (among kept documents) belongs to the validation split.

    A hash of (seed, index) rather than a random generator: the split of a document never
    depends on how the stream was chunked or parallelized.
    """
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def assign_splits(
    documents: Iterable[np.ndarray], seed: int, val_fraction: float
) -> Iterator[tuple[str, np.ndarray]]:
    """Pair each document with "train" or "val", keeping order.

    One document is held back so that, when ``val_fraction > 0`` and no document hashed
    into val, the last one can still go there: a tiny corpus still gets a validation split.
    """
    pending: tuple[str, np.ndarray] | None = None
    any_val = False
    for index, ids in enumerate(documents):
        if pending is not None:
            yield pending
        split = "val" if in_val_split(seed, index, val_fraction) else "train"
        any_val = any_val or split == "val"
        pending = (split, ids)
    if pending is not None:
        if val_fraction > 0 and not any_val:
            pending = ("val", pending[1])
        yield pending


def _check_splits(writers: dict[str, SplitWriter], what_was_read: str, hint: str) -> None:
    if writers["train"].documents == 0 and writers["val"].documents == 0:
        raise DataError(
            f"no usable documents: the dataset would be empty ({what_was_read}); {hint}"
        )
    if writers["train"].documents == 0:
        raise DataError(
            f"the training split is empty: all {writers['val'].documents} documents went to "
            f"validation; add documents or lower --val-fraction (0 disables validation)"
        )


def _split_entry(writer: SplitWriter) -> dict:
    return {
        "documents": writer.documents,
        "tokens": writer.tokens,
        "shards": [r.shard for r in writer.records],
    }


class TokenCounter:
    """Counts of each token id, accumulated with one bincount per ~1M tokens."""

    def __init__(self, vocab_size: int) -> None:
        self._counts = np.zeros(vocab_size, dtype=np.int64)
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def add(self, ids: np.ndarray) -> None:
        """Count one document's ids."""
        self._pending.append(ids)
        self._pending_tokens += ids.size
        if self._pending_tokens >= COUNT_FLUSH_TOKENS:
            self._flush()

    def totals(self) -> np.ndarray:
        """The counts so far, int64 of length vocab_size."""
        self._flush()
        return self._counts

    def _flush(self) -> None:
        if self._pending:
            ids = np.concatenate(self._pending)
            self._counts += np.bincount(ids, minlength=self._counts.size)
            self._pending, self._pending_tokens = [], 0


def check_out(out: Path) -> None:
    """Only a dataset of ours may be replaced; never someone else's directory."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / DATASET_JSON).exists():
        raise DataError(
            f"--out {out} is a non-empty directory that is not a dataset; "
            f"pass a new or empty directory, or remove it first"
        )


def reusable(out: Path, key: str) -> dict | None:
    """dataset.json of a complete dataset at ``out`` built with ``key``, else None."""
    if not (out / DATASET_JSON).is_file():
        return None
    try:
        info, records = check_complete(out)
    except DataError as e:
        log.info("replacing the incomplete dataset at %s (%s)", out, e)
        return None
    if info.get("build_key") != key:
        log.info("replacing the dataset at %s: its inputs or settings differ", out)
        return None
    if any(r.index_sha256 is None for r in records):
        # Without range indexes every rank would read whole shards (data_pipeline.range_reads).
        log.info("replacing the dataset at %s: it was built before shard range indexes", out)
        return None
    return info


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A fresh directory to write the dataset into; renamed to ``out`` if the block succeeds.

    On any exception (Ctrl-C included) the staging directory is removed and ``out`` is left
    as it was.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp_dir(out)
    try:
        yield tmp
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_temp_dir(out: Path) -> Path:
    """A fresh hidden directory beside ``out``: same file system, so the final rename is atomic.

    Not tempfile.mkdtemp: its 0700 mode would stick to the finished dataset; os.mkdir
    applies the umask like any other new directory.
    """
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp)
    return tmp


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished dataset to ``out``, replacing an older dataset there.

    The old one is moved aside first and deleted last, so ``out`` is only ever missing
    for the instant between two renames, never half-written.
    """
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def progress_bar(desc: str, total: int | None, enabled: bool) -> tqdm:
    """A bar on stderr (tqdm's default stream) counting input bytes, with MB/s and an ETA
    from ``total``; callers add documents and tokens as a postfix."""
    return tqdm(
        desc=desc,
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        disable=not enabled,
        mininterval=0.5,
    )


def summarize(info: dict) -> str:
    """One line of split sizes from dataset.json."""
    parts = []
    for split in SPLITS:
        entry = info["splits"][split]
        parts.append(
            f"{split} {entry['documents']:,} documents, {entry['tokens']:,} tokens, "
            f"{len(entry['shards'])} shards"
        )
    return "; ".join(parts)
