"""Token ids of a document stream, encoded by worker processes and returned in input order.

The main process reads the documents and cuts them into chunks of about CHUNK_BYTES; each
chunk goes to a worker process that encodes it with its own copy of the tokenizer and sends
back one flat id array plus the document lengths. Results are taken in submission order, so
the output is the same whatever the number of workers, and at most IN_FLIGHT_PER_WORKER
chunks per worker are read ahead, so memory stays flat whatever the number of documents (a
chunk holds at least one whole document, so the largest document sets the ceiling).

Each worker is single-threaded (TOKENIZERS_PARALLELISM=false, set in the worker process
only): one worker is one core, and the workers do not fight the Rust thread pool over the same
cores. ``workers=1`` is one such worker process, which keeps the caller's environment untouched.
The byte tokenizer involves no thread pool (numpy) and always encodes in the calling process.
The processes are data_pipeline.workers' OrderedWorkers, the loader's pool.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np

from data_pipeline.tokenizer import Tokenizer
from data_pipeline.workers import OrderedWorkers

# About half a megabyte of text per task: big enough that the inter-process traffic is a
# small share of the work, small enough to balance the load across workers.
CHUNK_BYTES = 1 << 19
CHUNK_DOCUMENTS = 4096
IN_FLIGHT_PER_WORKER = 2
PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"

Tag = TypeVar("Tag")
# One chunk's result: the documents' lengths (int64) and their ids, concatenated.
Encoded = tuple[np.ndarray, np.ndarray]


class ChunkEncoder:
    """What a worker runs on each chunk: texts -> (lengths, ids).

    It carries the tokenizer as its tokenizer.json bytes, so it pickles small where workers are
    spawned, and builds the tokenizer once per worker process, on its first chunk.
    """

    def __init__(self, json_bytes: bytes, dtype: np.dtype):
        self.json_bytes, self.dtype = json_bytes, np.dtype(dtype)
        self._tokenizer: Tokenizer | None = None

    def __call__(self, texts: list[str]) -> Encoded:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.json_bytes, origin="<worker>")
        return self._tokenizer.encode_flat(texts, self.dtype)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and Slurm set)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return max(os.cpu_count() or 1, 1)


def encode_in_order(
    tok: Tokenizer,
    chunks: Iterable[tuple[Tag, list[str]]],
    dtype: np.dtype,
    workers: int,
) -> Iterator[tuple[Tag, Encoded]]:
    """Encode each ``(tag, texts)`` chunk, yielding ``(tag, (lengths, ids))`` in input order."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if tok.is_byte_tokenizer:
        for tag, texts in chunks:
            yield tag, tok.encode_flat(texts, dtype)
        return
    # The tags stay here: a chunk's results come back in submission order, so the oldest tag
    # is always the one of the next result.
    tags: deque[Tag] = deque()

    def texts_of_chunks() -> Iterator[list[str]]:
        for tag, texts in chunks:
            tags.append(tag)
            yield texts

    pool = OrderedWorkers(
        ChunkEncoder(tok.json_bytes, dtype),
        workers,
        prefetch=IN_FLIGHT_PER_WORKER,
        start_method=_start_method(),
        env={PARALLELISM_ENV: "false"},
        role="tokenizer worker",
        memory_hint="--workers",
    )
    try:
        for encoded in pool.map(texts_of_chunks()):
            yield tags.popleft(), encoded
    finally:
        # An error or an abandoned generator stops the workers too: they leave once their queued
        # chunks are done, or are terminated after OrderedWorkers.close waits 5 s for that.
        pool.close()


def _start_method() -> str:
    """fork on Linux, spawn elsewhere.

    fork starts a worker in milliseconds and, unlike spawn, does not re-run the caller's
    main script in each worker (a script without an ``if __name__ == "__main__"`` guard
    would hang). It is safe here although the parent may have run the tokenizers thread
    pool (it trained the tokenizer): tokenizers turns its parallelism off in a forked child,
    and the workers run single-threaded anyway. macOS system libraries are not fork-safe,
    hence spawn there.
    """
    return "fork" if sys.platform.startswith("linux") else "spawn"


def chunk_documents(
    documents: Iterable[str], position: Callable[[], Tag]
) -> Iterator[tuple[Tag, list[str]]]:
    """Group documents into chunks of about CHUNK_BYTES (or CHUNK_DOCUMENTS documents).

    Each chunk is tagged with ``position()`` read right after its last document, which the
    caller uses for progress (the input bytes read so far).
    """
    chunk: list[str] = []
    size = 0
    for text in documents:
        chunk.append(text)
        # Characters, not UTF-8 bytes: a close enough measure for sizing work, and free.
        size += len(text)
        if size >= CHUNK_BYTES or len(chunk) >= CHUNK_DOCUMENTS:
            yield position(), chunk
            chunk, size = [], 0
    if chunk:
        yield position(), chunk
