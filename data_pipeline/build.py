"""The dataset builder: sources -> tokenizer -> token ids -> shards, manifest and counts.

``build`` streams documents, so memory stays flat whatever the corpus size. It writes into a
temporary directory next to the output and renames it into place at the end, so a crash
never leaves a half-written dataset behind; and it does nothing when the output already
holds a complete dataset built from the same inputs and settings.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tokenizers
from tqdm import tqdm

from data_pipeline.digest import json_sha256
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
    write_dataset_info,
    write_manifest,
)
from data_pipeline.sources import SourceStats, iter_documents, resolve_inputs, sources_sha256
from data_pipeline.tokenizer import Tokenizer, check_vocab_size

# Bump when a change here changes the output for the same inputs and settings, so that
# datasets built by older code are rebuilt instead of reused.
BUILDER_VERSION = 1
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_VAL_FRACTION = 0.02
DEFAULT_SHARD_TOKENS = 2**20
# Documents per encode_batch call: large enough for the Rust side to use every core, small
# enough to keep memory flat. This is also the unit a future worker pool would map over.
CHUNK_DOCUMENTS = 256
# Token ids buffered before one np.bincount: one bincount per document would cost
# O(vocab_size) each time, which dominates for short documents and big vocabularies.
COUNT_FLUSH_TOKENS = 1 << 20

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildSettings:
    """The settings that shape a dataset; stored as ``settings`` in dataset.json."""

    vocab_size: int
    val_fraction: float
    shard_tokens: int
    seed: int
    text_field: str

    def check(self) -> None:
        """Reject values that cannot build a dataset, naming the option to change."""
        check_vocab_size(self.vocab_size)
        if not isinstance(self.val_fraction, (int, float)) or not 0 <= self.val_fraction < 1:
            raise DataError(
                f"val_fraction {self.val_fraction!r} must be in [0, 1); pass e.g. "
                f"--val-fraction 0.02 (or 0 for no validation split)"
            )
        if type(self.shard_tokens) is not int or self.shard_tokens < 1:
            raise DataError(f"shard_tokens {self.shard_tokens!r} must be a positive integer")
        if type(self.seed) is not int:
            raise DataError(f"seed {self.seed!r} must be an integer")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise DataError(f"text_field {self.text_field!r} must be a non-empty column name")


@dataclass(frozen=True)
class BuildResult:
    """What ``build`` produced (or found already there)."""

    out: Path
    info: dict
    reused: bool
    seconds: float

    @property
    def fingerprint(self) -> str:
        """The dataset fingerprint from dataset.json."""
        return self.info["fingerprint"]


def build(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    vocab_size: int | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    text_field: str = "text",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    seed: int = 0,
    progress: bool = True,
) -> BuildResult:
    """Build a tokenized dataset at ``out`` from ``inputs`` (files, directories, globs).

    Trains a byte-level BPE tokenizer of ``vocab_size`` (default 4096) on the inputs, or
    loads ``tokenizer`` (a tokenizer.json) instead. Returns without work if ``out`` already
    holds a complete dataset with the same inputs and settings.
    """
    start = time.perf_counter()
    out = Path(out).absolute()
    loaded = Tokenizer.load(tokenizer) if tokenizer is not None else None
    settings = _settings(vocab_size, loaded, val_fraction, shard_tokens, seed, text_field)
    paths = resolve_inputs(inputs, exclude=[out])
    _check_out(out)
    source_digest = sources_sha256(paths)
    key = _build_key(settings, source_digest, loaded)
    existing = _reusable(out, key)
    if existing is not None:
        log.info(
            "%s already holds this dataset (fingerprint %s); nothing to do",
            out,
            existing["fingerprint"][:12],
        )
        return BuildResult(out, existing, reused=True, seconds=time.perf_counter() - start)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp_dir(out)
    try:
        tok = loaded if loaded is not None else _train_tokenizer(paths, settings, progress)
        info, records = _write_dataset(tmp, tok, paths, settings, progress)
        info["fingerprint"] = fingerprint(tok.sha256, source_digest, info["settings"], records)
        info.update(sources_sha256=source_digest, build_key=key, sources=[str(p) for p in paths])
        write_dataset_info(tmp, info)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    log.info("wrote %s in %.1f s: %s", out, seconds, summarize(info))
    return BuildResult(out, info, reused=False, seconds=seconds)


def _settings(
    vocab_size: int | None,
    loaded: Tokenizer | None,
    val_fraction: float,
    shard_tokens: int,
    seed: int,
    text_field: str,
) -> BuildSettings:
    """Resolve the vocabulary size against a loaded tokenizer, then check everything."""
    if loaded is not None:
        if vocab_size is not None and vocab_size != loaded.vocab_size:
            raise DataError(
                f"vocab_size {vocab_size} conflicts with the loaded tokenizer's "
                f"{loaded.vocab_size}; drop --vocab-size when passing --tokenizer"
            )
        vocab_size = loaded.vocab_size
    elif vocab_size is None:
        vocab_size = DEFAULT_VOCAB_SIZE
    settings = BuildSettings(vocab_size, val_fraction, shard_tokens, seed, text_field)
    settings.check()
    return settings


def _check_out(out: Path) -> None:
    """Only a dataset of ours may be replaced; never someone else's directory."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / DATASET_JSON).exists():
        raise DataError(
            f"--out {out} is a non-empty directory that is not a dataset; "
            f"pass a new or empty directory, or remove it first"
        )


def _build_key(settings: BuildSettings, source_digest: str, loaded: Tokenizer | None) -> str:
    """Everything that determines the output, known before any work is done.

    The final fingerprint also covers the shard hashes, which need the work; this key lets
    a rebuild be skipped. The tokenizers version is in it because training may change
    between releases.
    """
    return json_sha256(
        {
            "builder_version": BUILDER_VERSION,
            "format_version": FORMAT_VERSION,
            "sources_sha256": source_digest,
            "settings": asdict(settings),
            "tokenizer": loaded.sha256 if loaded is not None else "train",
            "tokenizers_version": tokenizers.__version__,
        }
    )


def _reusable(out: Path, key: str) -> dict | None:
    """dataset.json of a complete dataset at ``out`` built with ``key``, else None."""
    if not (out / DATASET_JSON).is_file():
        return None
    try:
        info, _ = check_complete(out)
    except DataError as e:
        log.info("replacing the incomplete dataset at %s (%s)", out, e)
        return None
    if info.get("build_key") != key:
        log.info("replacing the dataset at %s: its inputs or settings differ", out)
        return None
    return info


def _train_tokenizer(paths: Sequence[Path], settings: BuildSettings, progress: bool) -> Tokenizer:
    """Train on every source document (one extra streaming pass over the corpus)."""
    stats = SourceStats()
    documents = iter_documents(paths, settings.text_field, stats)
    with _progress_bar("training tokenizer", progress) as bar:
        tok = Tokenizer.train(_track(documents, stats, bar), settings.vocab_size)
    log.info(
        "trained a %d-token BPE tokenizer on %d documents (%.1f MB)",
        tok.vocab_size,
        stats.documents,
        stats.text_bytes / 1e6,
    )
    return tok


def _track(documents: Iterable[str], stats: SourceStats, bar: tqdm) -> Iterator[str]:
    """Pass documents through while the progress bar follows the bytes read."""
    seen = stats.text_bytes
    for text in documents:
        bar.update(stats.text_bytes - seen)
        seen = stats.text_bytes
        yield text
    bar.update(stats.text_bytes - seen)


def _write_dataset(
    root: Path, tok: Tokenizer, paths: Sequence[Path], settings: BuildSettings, progress: bool
) -> tuple[dict, list[ShardRecord]]:
    """Tokenize every document into shards under ``root``.

    Returns dataset.json less what the caller adds (fingerprint, sources), and the shards.
    """
    tok.save(root / TOKENIZER_FILE)
    dtype = token_dtype(tok.vocab_size)
    writers = {s: SplitWriter(root, s, settings.shard_tokens, dtype) for s in SPLITS}
    counters = {s: TokenCounter(tok.vocab_size) for s in SPLITS}
    stats = SourceStats()
    documents = iter_documents(paths, settings.text_field, stats)
    with _progress_bar("tokenizing", progress) as bar:
        token_ids = _tokenize(tok, documents, dtype, stats, bar)
        for split, ids in assign_splits(token_ids, settings.seed, settings.val_fraction):
            writers[split].add(ids)
            counters[split].add(ids)
    records = [r for s in SPLITS for r in writers[s].close()]
    _check_splits(writers, stats)
    np.savez(root / TOKEN_COUNTS_FILE, **{s: counters[s].totals() for s in SPLITS})
    write_manifest(root / MANIFEST_FILE, records)
    log.info("read %s", stats.summary())
    info = {
        "format_version": FORMAT_VERSION,
        "fingerprint": None,  # filled in by the caller; here to keep the key order readable
        "dtype": dtype.name,
        "tokenizer": {"file": TOKENIZER_FILE, **tok.describe()},
        "settings": asdict(settings),
        "splits": {s: _split_entry(writers[s]) for s in SPLITS},
        "skipped": stats.skipped(),
    }
    return info, records


def _tokenize(
    tok: Tokenizer, documents: Iterable[str], dtype: np.dtype, stats: SourceStats, bar: tqdm
) -> Iterator[np.ndarray]:
    """Token id arrays, in document order, encoded a chunk of documents at a time.

    A worker pool would go here: map ``tok.encode_batch`` over chunks (imap keeps order).
    """
    seen_bytes = tokens = 0
    for chunk in _chunks(documents, CHUNK_DOCUMENTS):
        for ids in tok.encode_batch(chunk):
            if not ids:
                # Only a tokenizer that normalizes text away (a loaded one) can get here.
                stats.skip("empty", "a document that encodes to zero tokens")
                continue
            tokens += len(ids)
            yield np.asarray(ids, dtype=dtype)
        bar.update(stats.text_bytes - seen_bytes)
        seen_bytes = stats.text_bytes
        bar.set_postfix_str(f"docs={stats.documents:,} tokens={tokens:,}", refresh=False)


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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


def _check_splits(writers: dict[str, SplitWriter], stats: SourceStats) -> None:
    if writers["train"].documents == 0 and writers["val"].documents == 0:
        raise DataError(
            f"the inputs hold no usable documents ({stats.summary()}); check the paths "
            f"and --text-field"
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


def _progress_bar(desc: str, enabled: bool) -> tqdm:
    """A bytes-per-second bar on stderr (tqdm's default stream)."""
    return tqdm(desc=desc, unit="B", unit_scale=True, disable=not enabled, mininterval=0.5)


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
