"""sha256 helpers shared by the source hashing, the shards and the fingerprint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_pipeline.errors import DataError

BLOCK_BYTES = 1 << 20


def file_digest(path: str | Path) -> tuple[int, str]:
    """(size in bytes, hex sha256) of a file, read in blocks so big files stay out of memory."""
    digest = hashlib.sha256()
    size = 0
    try:
        with Path(path).open("rb") as handle:
            while block := handle.read(BLOCK_BYTES):
                digest.update(block)
                size += len(block)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}; check that the file exists") from e
    return size, digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    return file_digest(path)[1]


def json_sha256(value: object) -> str:
    """Hex sha256 of a JSON value in canonical form (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
