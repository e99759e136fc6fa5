"""Where documents come from: .txt / .jsonl / .parquet files, and the stdlib demo corpus.

A document is one ``str``. Documents that cannot be used (empty, bad UTF-8, a bad JSON
line, a missing or non-string text field) are counted per reason in ``SourceStats`` and
reported by the builder, never dropped silently.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.digest import file_digest, json_sha256
from data_pipeline.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
# Files picked up when a directory is given. Files named explicitly (or matched by a glob)
# may have any suffix: everything that is not JSONL or Parquet is read as one text document.
DIRECTORY_SUFFIXES = (".txt", *JSONL_SUFFIXES, *PARQUET_SUFFIXES)

# Parts of the standard library that are not representative source code (test suites with
# deliberately odd encodings, vendored or removed-soon packages, demos, and machine-generated
# data: the charmap tables of `encodings` and the single 750 KB string of `pydoc_data`, a fifth
# of the bytes, which a small model would otherwise spend its capacity memorising) or not
# stdlib at all.
STDLIB_EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "encodings",
        "pydoc_data",
        "__pycache__",
    }
)

# Reasons a document is skipped. "empty" stands alone; the others are kinds of "undecodable".
UNDECODABLE_REASONS = ("bad_utf8", "bad_json", "missing_field", "not_text")
PARQUET_BATCH_ROWS = 1024
# The tokenizer sample reads at least this much of each file it visits: enough documents of
# one file to be worth opening it, and few enough that a sample visits many files.
SAMPLE_MIN_FILE_BYTES = 1 << 20


@dataclass
class SourceStats:
    """Counts of what reading the sources produced, with the first example of each skip."""

    files: int = 0
    documents: int = 0
    text_bytes: int = 0
    # Bytes of the input files read so far (Parquet: in proportion to the rows read), which
    # a progress bar compares with the total file size for its ETA.
    input_bytes: int = 0
    empty: int = 0
    undecodable: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(UNDECODABLE_REASONS, 0)
    )
    # reason -> "path:line" of the first occurrence, so a report points at a real example.
    first_example: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        """Count one skipped document; ``reason`` is "empty" or one of UNDECODABLE_REASONS."""
        if reason == "empty":
            self.empty += 1
        elif reason in self.undecodable:
            self.undecodable[reason] += 1
        else:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.first_example.setdefault(reason, where)

    def accept(self, text: str) -> None:
        """Count one document that was kept."""
        self.documents += 1
        self.text_bytes += len(text.encode("utf-8"))

    def skipped(self) -> dict[str, object]:
        """The ``skipped`` entry of dataset.json: totals plus the undecodable breakdown."""
        return {
            "empty": self.empty,
            "undecodable": sum(self.undecodable.values()),
            "undecodable_by_reason": dict(self.undecodable),
        }

    def summary(self) -> str:
        """One line for logs: kept and skipped counts with an example location per reason."""
        parts = [f"{self.documents} documents from {self.files} files"]
        for reason in ("empty", *UNDECODABLE_REASONS):
            count = self.empty if reason == "empty" else self.undecodable[reason]
            if count:
                parts.append(f"skipped {count} {reason} (first: {self.first_example[reason]})")
        return "; ".join(parts)


def resolve_inputs(
    inputs: Sequence[str | os.PathLike[str]], exclude: Sequence[Path] = ()
) -> list[Path]:
    """Expand files, directories and globs into a sorted, de-duplicated list of files.

    ``exclude`` holds directories to leave out (the output dataset when it lies inside an
    input directory, so that a rebuild does not read its own manifest.parquet).
    """
    if not inputs:
        raise DataError("no inputs given; pass --input PATH (files, directories, globs)")
    excluded = [Path(e).absolute() for e in exclude]
    found: set[Path] = set()
    for item in inputs:
        found.update(_expand(str(item)))
    files = sorted(p for p in found if not any(p.is_relative_to(e) for e in excluded))
    if not files:
        raise DataError(f"inputs {list(map(str, inputs))} hold no readable files")
    return files


def _expand(item: str) -> list[Path]:
    """One input -> the files it names."""
    path = Path(item)
    if path.is_dir():
        return _walk_directory(path)
    if path.is_file():
        return [path.absolute()]
    if glob.has_magic(item):
        matches = sorted(glob.glob(item, recursive=True))
        if not matches:
            raise DataError(f"input glob {item!r} matches nothing; check the pattern")
        files: list[Path] = []
        for match in matches:
            files.extend(_expand(match))
        return files
    raise DataError(f"input {item!r} does not exist; pass an existing file, directory or glob")


def _walk_directory(root: Path) -> list[Path]:
    """Files below ``root`` with a known suffix, skipping hidden files and directories."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.endswith(DIRECTORY_SUFFIXES):
                files.append(Path(dirpath, name).absolute())
    return files


def stdlib_sources() -> list[Path]:
    """The running Python's standard library .py files, sorted: the demo corpus.

    Every machine with Python has it, so the demo needs no download.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        files.extend(Path(dirpath, n) for n in filenames if n.endswith(".py"))
    if not files:
        raise DataError(f"found no .py files under the standard library at {root}")
    return sorted(files)


def iter_documents(
    paths: Iterable[Path], text_field: str = "text", stats: SourceStats | None = None
) -> Generator[str, None, None]:
    """Yield every usable document of ``paths`` in order, counting skips into ``stats``."""
    stats = SourceStats() if stats is None else stats
    for path in paths:
        stats.files += 1
        for text in _read_file(Path(path), text_field, stats):
            stats.accept(text)
            yield text


def _read_file(path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    """Dispatch on the suffix.

    Each reader counts its skips where the location is known, and treats whitespace-only
    text as empty: it would only teach the model runs of spaces.
    """
    if path.name.endswith(JSONL_SUFFIXES):
        yield from _read_jsonl(path, text_field, stats)
    elif path.name.endswith(PARQUET_SUFFIXES):
        yield from _read_parquet(path, text_field, stats)
    else:
        yield from _read_text(path, stats)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read source file {path}: {e.strerror}; check the path") from e


def _read_text(path: Path, stats: SourceStats) -> Iterator[str]:
    """A whole file is one document."""
    data = _read_bytes(path)
    stats.input_bytes += len(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip("bad_utf8", str(path))
        return
    if not text.strip():
        stats.skip("empty", str(path))
        return
    yield text


def _read_jsonl(path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    """One JSON object per line; the document is ``obj[text_field]``."""
    try:
        handle = path.open("rb")
    except OSError as e:
        raise DataError(f"cannot read source file {path}: {e.strerror}; check the path") from e
    with handle:
        for number, raw in enumerate(handle, start=1):
            stats.input_bytes += len(raw)
            where = f"{path}:{number}"
            text = _decode_json_line(raw, text_field, where, stats)
            if text is None:
                continue
            if not text.strip():
                stats.skip("empty", where)
                continue
            yield text


def _decode_json_line(raw: bytes, text_field: str, where: str, stats: SourceStats) -> str | None:
    """The text of one JSONL line, or None after counting why it has none."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip("bad_utf8", where)
        return None
    if not line.strip():
        stats.skip("empty", where)
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        stats.skip("bad_json", where)
        return None
    if not isinstance(obj, dict) or text_field not in obj:
        stats.skip("missing_field", where)
        return None
    text = obj[text_field]
    if text is None:
        stats.skip("empty", where)
        return None
    if not isinstance(text, str):
        stats.skip("not_text", where)
        return None
    if not text.isascii():
        # JSON escapes can spell lone surrogates ("\ud800") that no UTF-8 encoder accepts.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            stats.skip("bad_utf8", where)
            return None
    return text


def _read_parquet(path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    """Stream the text column batch by batch so a large file never sits in memory."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read parquet file {path}: {e}; check the file") from e
    _check_parquet_column(parquet.schema_arrow, path, text_field)
    start, size = stats.input_bytes, path.stat().st_size
    rows = max(parquet.metadata.num_rows, 1)
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        stats.input_bytes = start + size * (row + batch.num_rows) // rows
        for value in _parquet_texts(batch.column(0)):
            row += 1
            where = f"{path}:row {row}"
            if isinstance(value, bytes):
                stats.skip("bad_utf8", where)
            elif value is None or not value.strip():
                stats.skip("empty", where)
            else:
                yield value
    stats.input_bytes = start + size


def _parquet_texts(column: pa.Array) -> list[str | bytes | None]:
    """The column as Python strings; rows that are not valid UTF-8 stay ``bytes``.

    Arrow does not validate UTF-8 when reading, so a bad row only shows up on conversion;
    then the batch is converted again row by row to find and count it.
    """
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        return [_decode_or_bytes(b) for b in column.cast(pa.binary()).to_pylist()]


def _decode_or_bytes(raw: bytes | None) -> str | bytes | None:
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _check_parquet_column(schema: pa.Schema, path: Path, text_field: str) -> None:
    """A wrong column is a setting error for the whole file, not a per-row skip."""
    if text_field not in schema.names:
        raise DataError(
            f"parquet file {path} has no column {text_field!r} (columns: {schema.names}); "
            f"pass --text-field with the column that holds the text"
        )
    kind = schema.field(text_field).type
    if not (
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    ):
        raise DataError(
            f"column {text_field!r} of parquet file {path} has type {kind}, not string; "
            f"pass --text-field with the column that holds the text"
        )


def sample_documents(
    paths: Sequence[Path],
    sizes: Sequence[int],
    budget_bytes: int,
    text_field: str = "text",
    stats: SourceStats | None = None,
) -> Iterator[str]:
    """A deterministic sample of about ``budget_bytes`` of text, to train a tokenizer on.

    A corpus that fits the budget is read whole, in order. A larger one is read file by
    file in an order shuffled by a hash of each file's position, taking whole documents from
    the start of each file up to an equal share of the budget (at least
    SAMPLE_MIN_FILE_BYTES), until the budget is spent. So the sample reads about
    ``budget_bytes`` whatever the corpus size, and spreads over many files when there are
    many; a corpus of one huge file gives its first ``budget_bytes``.
    """
    stats = SourceStats() if stats is None else stats
    if sum(sizes) <= budget_bytes:
        yield from iter_documents(paths, text_field, stats)
        return
    order = sorted(
        range(len(paths)), key=lambda i: hashlib.sha256(f"tokenizer-sample:{i}".encode()).digest()
    )
    per_file = max(budget_bytes // len(paths), SAMPLE_MIN_FILE_BYTES)
    for index in order:
        start = stats.text_bytes
        documents = iter_documents([paths[index]], text_field, stats)
        for text in documents:
            yield text
            if stats.text_bytes - start >= per_file or stats.text_bytes >= budget_bytes:
                break
        documents.close()
        if stats.text_bytes >= budget_bytes:
            return


def source_digests(paths: Sequence[Path]) -> list[tuple[int, str]]:
    """(size in bytes, hex sha256) of every source, in order."""
    return [file_digest(p) for p in paths]


def sources_sha256(paths: Sequence[Path], digests: Sequence[tuple[int, str]] | None = None) -> str:
    """One digest over the content (size and sha256) of every source, in order.

    Paths are deliberately left out: the same corpus copied elsewhere (the stdlib lives
    at a different path on every machine) gives the same digest. The order is part of it
    because documents keep corpus order in the shards. Pass ``digests`` (from
    ``source_digests``) to avoid hashing the files twice.
    """
    digests = source_digests(paths) if digests is None else digests
    return json_sha256([list(d) for d in digests])
