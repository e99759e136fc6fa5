"""Worker processes: a function mapped over a stream of tasks, results in task order.

The one worker pool of the project: the training data loader makes batches with it, and
`pretrain-data build` encodes text with it (data_pipeline.encode).

Task k of a stream goes to worker k % n (round robin), so the workers share the work without
overlap; each worker answers its tasks in the order it got them on a queue of its own, so the
results come back in task order without any reordering buffer. Up to `prefetch` tasks per
worker are in flight ahead of the one being waited for.

The function must be picklable when the start method is not fork. Workers ignore SIGINT and
SIGUSR1 (the parent handles stop requests and closes them), die on SIGTERM, and exit by
themselves when their parent dies (at once on Linux, within POLL_S elsewhere).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from data_pipeline.errors import DataError

POLL_S = 1.0  # how often a waiting side checks that the other is still alive
PR_SET_PDEATHSIG = 1  # prctl(2)
_END = object()  # the end of a task stream (None is the workers' own stop message)


def _worker_main(
    fn: Callable[[Any], Any], tasks: Any, results: Any, parent: int, env: Mapping[str, str]
) -> None:
    # Settings for this worker only (e.g. a single-threaded tokenizer): set here, in the
    # child, so the parent's environment is never changed.
    os.environ.update(env)
    # A forked worker inherits the trainer's stop handlers, which would turn the terminate()
    # of close() into a no-op; stops are the parent's business (it closes us), so SIGINT and
    # SIGUSR1 are ignored and SIGTERM kills.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    # Results nobody will read must not keep this process alive at exit (the queue's feeder
    # thread would wait for the parent to drain the pipe).
    results.cancel_join_thread()
    if os.getppid() != parent:
        return  # the parent died before we installed the death signal
    while True:
        try:
            task = tasks.get(timeout=POLL_S)
        except queue.Empty:
            if os.getppid() != parent:
                return  # orphaned: the trainer died without closing us
            continue
        if task is None:
            return
        try:
            results.put(("ok", fn(task)))
        except Exception as e:  # sent back whole: the parent raises it at the right batch
            kind = "data" if isinstance(e, DataError) else "other"
            results.put((kind, str(e) if kind == "data" else traceback.format_exc()))


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL when the parent dies, even of SIGKILL (elsewhere the
    periodic parent check in _worker_main does it, within POLL_S)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _shutdown(processes: list[Any], task_queues: list[Any], result_queues: list[Any]) -> None:
    for q in task_queues:
        try:
            q.put(None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 5  # for all of them: a polite exit after their task
    for p in processes:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
        if p.is_alive():  # never leave a worker behind, whatever it is stuck in
            p.kill()
            p.join(timeout=5)
    for q in (*task_queues, *result_queues):
        q.cancel_join_thread()  # never block interpreter exit on an unread result
        q.close()


class OrderedWorkers:
    """`fn` mapped over a task iterator by `num_workers` processes, results in order.

    `env`: environment variables set in each worker process (never in the parent). `role` and
    `memory_hint` name the workers and the settings to lower in the error of a dead worker.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        num_workers: int,
        prefetch: int = 2,
        start_method: str | None = None,
        env: Mapping[str, str] | None = None,
        role: str = "data loader worker",
        memory_hint: str = "data.num_workers, data.prefetch or data.shuffle_window",
    ):
        if num_workers < 1 or prefetch < 1:
            raise ValueError("num_workers and prefetch must be >= 1")
        self.fn, self.num_workers, self.prefetch = fn, num_workers, prefetch
        self.env = dict(env or {})
        self.role, self.memory_hint = role, memory_hint
        # fork starts a worker in milliseconds and shares the parent's imports; spawn is the
        # fallback where fork does not exist.
        methods = mp.get_all_start_methods()
        self.start_method = start_method or ("fork" if "fork" in methods else "spawn")
        self._processes: list[Any] = []
        self._tasks_q: list[Any] = []
        self._results_q: list[Any] = []
        self._tasks: Iterator[Any] = iter(())
        self._in_flight: deque[int] = deque()  # worker of each submitted, unanswered task
        self._next_worker = 0
        self._finalizer: weakref.finalize | None = None

    def _start_processes(self) -> None:
        ctx = mp.get_context(self.start_method)
        for i in range(self.num_workers):
            tasks, results = ctx.Queue(), ctx.Queue()
            p = ctx.Process(  # type: ignore[attr-defined]
                target=_worker_main,
                args=(self.fn, tasks, results, os.getpid(), self.env),
                name=f"{self.role.replace(' ', '-')}-{i}",
                daemon=True,
            )
            p.start()
            self._processes.append(p)
            self._tasks_q.append(tasks)
            self._results_q.append(results)
        self._finalizer = weakref.finalize(
            self, _shutdown, self._processes, self._tasks_q, self._results_q
        )

    def start(self, tasks: Iterator[Any]) -> None:
        """Begin a new task stream; results of tasks still in flight are discarded."""
        if not self._processes:
            self._start_processes()
        while self._in_flight:
            self._receive(self._in_flight.popleft())
        self._tasks = tasks

    def next(self) -> Any:
        """The result of the next task of the stream (DataError from a worker is re-raised);
        StopIteration once the stream has ended and every result has been taken."""
        while len(self._in_flight) < self.num_workers * self.prefetch:
            task = next(self._tasks, _END)
            if task is _END:
                break
            w = self._next_worker
            self._tasks_q[w].put(task)
            self._in_flight.append(w)
            self._next_worker = (w + 1) % self.num_workers
        if not self._in_flight:
            raise StopIteration
        kind, value = self._receive(self._oldest())
        if kind == "data":
            raise DataError(value)
        if kind != "ok":
            raise RuntimeError(f"a {self.role} failed:\n{value}")
        return value

    def map(self, tasks: Iterable[Any]) -> Iterator[Any]:
        """The results of a finite task stream, in task order (a new stream, as `start`)."""
        self.start(iter(tasks))
        while True:
            try:
                result = self.next()
            except StopIteration:
                return
            yield result

    def _oldest(self) -> int:
        """The worker of the oldest unanswered task: waiting on it is what keeps the order."""
        return self._in_flight.popleft()

    def _receive(self, w: int) -> tuple[str, Any]:
        while True:
            try:
                return self._results_q[w].get(timeout=POLL_S)
            except queue.Empty:
                p = self._processes[w]
                if not p.is_alive():
                    raise RuntimeError(
                        f"{self.role} {w} (pid {p.pid}) exited with code {p.exitcode}; "
                        f"if it was killed for memory, lower {self.memory_hint}"
                    ) from None

    def close(self) -> None:
        """Stop the workers (also done when this object is garbage-collected)."""
        if self._finalizer is not None:
            self._finalizer()
        self._processes, self._tasks_q, self._results_q = [], [], []
        self._in_flight.clear()
        self._finalizer = None
