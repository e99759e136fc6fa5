"""Token ids of a document stream, encoded by worker processes and returned in input order.

The main process reads the documents and cuts them into chunks of about CHUNK_BYTES; each
chunk goes to a worker process that encodes it with its own copy of the tokenizer and sends
back one flat id array plus the document lengths. Results are taken in submission order, so
the output is the same whatever the number of workers, and at most IN_FLIGHT_PER_WORKER
chunks per worker are read ahead, so memory stays flat whatever the number of documents (a
chunk holds at least one whole document, so the largest document sets the ceiling).

Each worker is single-threaded (TOKENIZERS_PARALLELISM=false): one worker is one core, and
the workers do not fight the Rust thread pool over the same cores. ``workers=1`` encodes in
the calling process, also on one thread.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

import numpy as np

from data_pipeline.tokenizer import Tokenizer

# About half a megabyte of text per task: big enough that the inter-process traffic is a
# small share of the work, small enough to balance the load across workers.
CHUNK_BYTES = 1 << 19
CHUNK_DOCUMENTS = 4096
IN_FLIGHT_PER_WORKER = 2
PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"

Tag = TypeVar("Tag")
# One chunk's result: the documents' lengths (int64) and their ids, concatenated.
Encoded = tuple[np.ndarray, np.ndarray]

# Per-process state of a pool worker only: set once by ``_start_worker`` (the pool's
# initializer) so a task need not carry the tokenizer; the main process never sets it.
_worker_state: dict[str, Any] = {}


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
    if workers == 1:
        for tag, texts in chunks:
            with _single_threaded():
                encoded = tok.encode_flat(texts, dtype)
            yield tag, encoded
        return
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context(_start_method()),
        initializer=_start_worker,
        initargs=(tok.json_bytes, np.dtype(dtype).str),
    )
    try:
        pending: deque[tuple[Tag, Future[Encoded]]] = deque()
        for tag, texts in chunks:
            pending.append((tag, pool.submit(_encode_task, texts)))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                yield _next_result(pending)
        while pending:
            yield _next_result(pending)
    finally:
        # An error or an abandoned generator must not wait for chunks nobody will read.
        pool.shutdown(wait=True, cancel_futures=True)


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


def _next_result(pending: deque[tuple[Tag, Future[Encoded]]]) -> tuple[Tag, Encoded]:
    """The oldest submitted chunk's result (waiting for it): this is what keeps the order."""
    tag, future = pending.popleft()
    return tag, future.result()


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


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Keep the tokenizers thread pool off for one call in this process, then restore."""
    previous = os.environ.get(PARALLELISM_ENV)
    os.environ[PARALLELISM_ENV] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[PARALLELISM_ENV]
        else:
            os.environ[PARALLELISM_ENV] = previous


def _start_worker(json_bytes: bytes, dtype: str) -> None:
    """Pool initializer: one single-threaded tokenizer per worker process."""
    # Ctrl-C reaches the whole process group: the main process handles it (it stops the pool
    # and removes the half-written dataset); a traceback from every worker would only bury
    # its one-line message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ[PARALLELISM_ENV] = "false"
    _worker_state["tokenizer"] = Tokenizer(json_bytes, origin="<worker>")
    _worker_state["dtype"] = np.dtype(dtype)


def _encode_task(texts: list[str]) -> Encoded:
    return _worker_state["tokenizer"].encode_flat(texts, _worker_state["dtype"])
