"""The dataset builder: sources -> tokenizer -> token ids -> shards, manifest and counts.

``build`` streams documents, so memory stays flat whatever the number of documents (it grows
with the largest single document: a plain-text file is one document, read and encoded whole),
and encodes them in worker processes (``data_pipeline.encode``) with output identical for any
number of workers. It writes into a staging directory next to the output and renames it into
place at the end (``data_pipeline.writer``), so a crash never leaves a half-written dataset
behind; and it does nothing when the output already holds a complete dataset built from the same
inputs and settings.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tqdm import tqdm

from data_pipeline.digest import json_sha256
from data_pipeline.encode import available_cores, chunk_documents, encode_in_order
from data_pipeline.errors import DataError
from data_pipeline.shards import FORMAT_VERSION, write_dataset_info
from data_pipeline.sources import (
    SourceStats,
    iter_documents,
    resolve_inputs,
    sample_documents,
    source_digests,
    sources_sha256,
)
from data_pipeline.tokenizer import Tokenizer, check_vocab_size
from data_pipeline.writer import (
    DatasetWriter,
    check_out,
    progress_bar,
    reusable,
    staging,
    summarize,
)

# Bump when a change here changes the output for the same inputs and settings, so that
# datasets built by older code are rebuilt instead of reused.
BUILDER_VERSION = 2
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_VAL_FRACTION = 0.02
DEFAULT_SHARD_TOKENS = 2**20
DEFAULT_TOKENIZER_SAMPLE_MB = 256
# --tokenizer takes a tokenizer.json path or this word.
BYTES_TOKENIZER = "bytes"
# The kinds of tokenizer a dataset can have, as recorded in its settings.
TRAINED, BYTES, FILE = "bpe", "bytes", "file"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildSettings:
    """The settings that shape a dataset; stored as ``settings`` in dataset.json."""

    tokenizer: str
    vocab_size: int
    # Only a trained tokenizer depends on it; None for the others.
    tokenizer_sample_mb: float | None
    val_fraction: float
    shard_tokens: int
    seed: int
    text_field: str

    def check(self) -> None:
        """Reject values that cannot build a dataset, naming the option to change."""
        if self.tokenizer == TRAINED:
            # A given tokenizer has whatever size it has; only training needs room for the
            # bytes and the special tokens.
            check_vocab_size(self.vocab_size)
        if self.tokenizer_sample_mb is not None and (
            not isinstance(self.tokenizer_sample_mb, (int, float))
            or not self.tokenizer_sample_mb > 0
        ):
            raise DataError(
                f"tokenizer_sample_mb {self.tokenizer_sample_mb!r} must be a positive number; "
                f"pass e.g. --tokenizer-sample-mb {DEFAULT_TOKENIZER_SAMPLE_MB}"
            )
        check_split_settings(self.val_fraction, self.shard_tokens, self.seed)
        if not isinstance(self.text_field, str) or not self.text_field:
            raise DataError(f"text_field {self.text_field!r} must be a non-empty column name")


def check_split_settings(val_fraction: float, shard_tokens: int, seed: int) -> None:
    """The settings ``build`` and ``import`` share."""
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise DataError(
            f"val_fraction {val_fraction!r} must be in [0, 1); pass e.g. "
            f"--val-fraction 0.02 (or 0 for no validation split)"
        )
    if type(shard_tokens) is not int or shard_tokens < 1:
        raise DataError(
            f"shard_tokens {shard_tokens!r} must be a positive integer; pass --shard-tokens N"
        )
    if type(seed) is not int:
        raise DataError(f"seed {seed!r} must be an integer; pass --seed N")


def resolve_workers(workers: int | None) -> int:
    """``None`` -> every core this process may use; otherwise a positive integer."""
    if workers is None:
        return available_cores()
    if type(workers) is not int or workers < 1:
        raise DataError(
            f"workers {workers!r} must be a positive integer; pass --workers N "
            f"(leave it out to use all {available_cores()} cores)"
        )
    return workers


@dataclass(frozen=True)
class BuildResult:
    """What ``build`` (or ``import``) produced, or found already there."""

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
    tokenizer_sample_mb: float = DEFAULT_TOKENIZER_SAMPLE_MB,
    workers: int | None = None,
    progress: bool = True,
) -> BuildResult:
    """Build a tokenized dataset at ``out`` from ``inputs`` (files, directories, globs).

    ``tokenizer``: None trains a byte-level BPE of ``vocab_size`` (default 4096) on a sample
    of ``tokenizer_sample_mb`` MB of the inputs; "bytes" uses the byte tokenizer; anything
    else is a tokenizer.json to load. ``workers`` processes encode the text (default: every
    core); the output does not depend on it. Returns without work if ``out`` already holds
    a complete dataset with the same inputs and settings.
    """
    start = time.perf_counter()
    out = Path(out).absolute()
    given = given_tokenizer(tokenizer)
    settings = replace(
        _tokenizer_settings(given, tokenizer, vocab_size, tokenizer_sample_mb),
        val_fraction=val_fraction,
        shard_tokens=shard_tokens,
        seed=seed,
        text_field=text_field,
    )
    settings.check()
    workers = resolve_workers(workers)
    paths = resolve_inputs(inputs, exclude=[out])
    check_out(out)
    digests = source_digests(paths)
    source_digest = sources_sha256(paths, digests)
    key = build_key(asdict(settings), source_digest, given.sha256 if given else "train")
    existing = reusable(out, key)
    if existing is not None:
        log.info(
            "%s already holds this dataset (fingerprint %s); nothing to do",
            out,
            existing["fingerprint"][:12],
        )
        return BuildResult(out, existing, reused=True, seconds=time.perf_counter() - start)
    sizes = [size for size, _ in digests]
    with staging(out) as tmp:
        tok, trained_on = given, None
        if tok is None:
            tok, trained_on = _train_tokenizer(paths, sizes, settings, progress)
        writer = DatasetWriter(
            tmp, tok, shard_tokens=shard_tokens, seed=seed, val_fraction=val_fraction
        )
        stats = SourceStats()
        documents = iter_documents(paths, settings.text_field, stats)
        # The byte tokenizer encodes at ~1 GB/s in numpy: sending text to workers and ids
        # back would cost more than the encoding.
        encoders = 1 if tok.is_byte_tokenizer else workers
        with progress_bar("tokenizing", sum(sizes), progress) as bar:
            writer.write(_encode(tok, documents, stats, writer.dtype, encoders, bar))
        records = writer.finish(stats.summary())
        log.info("read %s", stats.summary())
        info = writer.info(
            records,
            settings=asdict(settings),
            skipped=stats.skipped(),
            sources=[str(p) for p in paths],
            source_digest=source_digest,
            build_key=key,
            tokenizer_extra={"trained_on": trained_on} if trained_on else None,
        )
        write_dataset_info(tmp, info)
    seconds = time.perf_counter() - start
    log.info("wrote %s in %.1f s (%d workers): %s", out, seconds, encoders, summarize(info))
    return BuildResult(out, info, reused=False, seconds=seconds)


def given_tokenizer(tokenizer: str | os.PathLike[str] | None) -> Tokenizer | None:
    """The tokenizer to use as is: the byte tokenizer, a loaded file, or None to train."""
    if tokenizer is None:
        return None
    if str(tokenizer) == BYTES_TOKENIZER:
        return Tokenizer.bytes()
    return Tokenizer.load(Path(tokenizer))


def _tokenizer_settings(
    given: Tokenizer | None,
    tokenizer: str | os.PathLike[str] | None,
    vocab_size: int | None,
    tokenizer_sample_mb: float,
) -> BuildSettings:
    """The tokenizer part of the settings (the rest at defaults); the vocabulary size is
    checked against a given tokenizer's."""
    if given is None:
        kind = TRAINED
        vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
    else:
        kind = BYTES if str(tokenizer) == BYTES_TOKENIZER else FILE
        if vocab_size is not None and vocab_size != given.vocab_size:
            raise DataError(
                f"vocab_size {vocab_size} conflicts with the {kind} tokenizer's "
                f"{given.vocab_size}; drop --vocab-size when passing --tokenizer"
            )
        vocab_size = given.vocab_size
    return BuildSettings(
        tokenizer=kind,
        vocab_size=vocab_size,
        # A float either way, so that 256 and 256.0 give the same build key.
        tokenizer_sample_mb=_as_float(tokenizer_sample_mb) if kind == TRAINED else None,
        val_fraction=DEFAULT_VAL_FRACTION,
        shard_tokens=DEFAULT_SHARD_TOKENS,
        seed=0,
        text_field="text",
    )


def _as_float(value: Any) -> Any:
    """Numbers as float; anything else as is, for ``check`` to reject by name."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if is_number else value


def build_key(settings: dict, source_digest: str, tokenizer: str) -> str:
    """Everything that determines the output, known before any work is done.

    The final fingerprint also covers the shard hashes, which need the work; this key lets
    a rebuild be skipped. The tokenizers version is in it because training (and encoding)
    may change between releases.
    """
    return json_sha256(
        {
            "builder_version": BUILDER_VERSION,
            "format_version": FORMAT_VERSION,
            "sources_sha256": source_digest,
            "settings": settings,
            "tokenizer": tokenizer,
            "tokenizers_version": tokenizers.__version__,
        }
    )


def _train_tokenizer(
    paths: Sequence[Path], sizes: Sequence[int], settings: BuildSettings, progress: bool
) -> tuple[Tokenizer, dict]:
    """Train BPE on a deterministic sample of the sources (a streaming pass over it)."""
    budget = int(settings.tokenizer_sample_mb * 1e6)
    stats = SourceStats()
    documents = sample_documents(paths, sizes, budget, settings.text_field, stats)
    with progress_bar("training tokenizer", min(budget, sum(sizes)), progress) as bar:
        tok = Tokenizer.train(_track(documents, stats, bar), settings.vocab_size)
    log.info(
        "trained a %d-token BPE tokenizer on %d documents (%.1f MB) of %d files",
        tok.vocab_size,
        stats.documents,
        stats.text_bytes / 1e6,
        stats.files,
    )
    return tok, {"documents": stats.documents, "text_bytes": stats.text_bytes}


def _track(documents: Iterable[str], stats: SourceStats, bar: tqdm) -> Iterator[str]:
    """Pass documents through while the progress bar follows the text bytes read."""
    seen = 0
    for text in documents:
        yield text
        bar.update(stats.text_bytes - seen)
        seen = stats.text_bytes


def _encode(
    tok: Tokenizer,
    documents: Iterable[str],
    stats: SourceStats,
    dtype: np.dtype,
    workers: int,
    bar: tqdm,
) -> Iterator[np.ndarray]:
    """Token id arrays of ``documents``, in order, encoded by ``workers`` processes.

    Documents that encode to nothing are skipped and counted (only a loaded tokenizer that
    normalizes text away can produce one).
    """
    chunks = chunk_documents(documents, lambda: (stats.input_bytes, stats.documents))
    seen = tokens = 0
    for (read, documents_read), (lengths, ids) in encode_in_order(tok, chunks, dtype, workers):
        for doc in np.split(ids, np.cumsum(lengths)[:-1]):
            if doc.size == 0:
                stats.skip("empty", "a document that encodes to zero tokens")
                continue
            yield doc
        tokens += ids.size
        bar.update(read - seen)
        seen = read
        bar.set_postfix_str(f"docs={documents_read:,} tokens={tokens:,}", refresh=False)
