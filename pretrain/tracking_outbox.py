"""MLflow calls delivered by a background thread, so that the tracking store's speed or absence
never reaches the training loop.

The loop only appends to a queue (microseconds). One daemon thread sends the queued calls in
order, merging consecutive metric records into batches. Metric records may wait up to `hold`
seconds to go out together: each delivery to a SQLite store costs the thread about 5 ms of CPU
and holds the GIL, time the next training step loses on a small machine (measured: the step
after every log step took 11 ms longer on the char config at two threads), while 20 log steps'
records in one batch cost about 18 ms. Any other call behind them, and closing, sends them at
once. A call that fails for a transient reason
(server down, connection refused, timeout, a locked SQLite file) stays at the head of the queue
and is retried with backoff, so nothing is lost or reordered while the store is away. A call the
store refuses for good (an invalid value, an unknown run) is skipped with a warning. The first
outage is reported once; closing waits a bounded time for the queue to drain, then reports what
was not delivered and leaves.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# MLflow error codes that no retry can fix: the call is skipped.
REFUSED = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "BAD_REQUEST",
    "INVALID_STATE",
}
BATCH = 1000  # MLflow's limit of metrics per log_batch call


def refused(e: BaseException) -> bool:
    return getattr(e, "error_code", None) in REFUSED


def warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class _Call:
    name: str
    fn: Callable[[Any], None] | None = None  # client -> None
    records: list[Any] = field(default_factory=list)  # metric records, for name == "metrics"
    done: threading.Event = field(default_factory=threading.Event)  # delivered or skipped
    queued_at: float = field(default_factory=time.monotonic)


class Outbox:
    """`call(name, fn)` queues `fn(client)`; `metrics(records)` queues metric records, sent as
    `send_metrics(client, batch)`, up to `hold` seconds after the first of them was queued
    (see the module docstring). `connect()` makes the client, in the thread, retried like any
    call."""

    def __init__(
        self,
        connect: Callable[[], Any],
        send_metrics: Callable[[Any, list[Any]], None],
        where: str,
        max_records: int = 100_000,
        max_backoff: float = 5.0,
        hold: float = 0.0,
    ):
        self._connect, self._send_metrics, self.where = connect, send_metrics, where
        self.max_records, self.max_backoff, self.hold = max_records, max_backoff, hold
        self._queue: deque[_Call] = deque()
        self._flight: _Call | None = None  # the call being sent: no records join it
        self._records = 0  # metric records queued
        self._cond = threading.Condition()
        self._closing = self._abandoned = False
        self.warned = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._loop, name="mlflow-outbox", daemon=True)
        self._thread.start()

    # --- the training side: never blocks on the store ----------------------------------------

    def call(self, name: str, fn: Callable[[Any], None]) -> threading.Event:
        """Queue `fn(client)`; the event is set once it is delivered (or refused)."""
        c = _Call(name, fn)
        with self._cond:
            self._queue.append(c)
            self._cond.notify()
        return c.done

    def metrics(self, records: list[Any]) -> None:
        if not records:
            return
        with self._cond:
            while self._records + len(records) > self.max_records and self._drop_oldest():
                pass
            tail = self._queue[-1] if self._queue else None
            joinable = tail is not None and tail is not self._flight and tail.name == "metrics"
            if joinable and len(tail.records) < BATCH:
                tail.records.extend(records)
            else:
                self._queue.append(_Call("metrics", records=list(records)))
            self._records += len(records)
            self._cond.notify()

    def _drop_oldest(self) -> bool:
        """Make room in a long outage: the oldest queued metrics not in flight go first."""
        for i, c in enumerate(self._queue):
            if i > 0 and c.name == "metrics":
                del self._queue[i]
                self._records -= len(c.records)
                self.dropped += len(c.records)
                if self.dropped == len(c.records):
                    warn(
                        f"MLflow: over {self.max_records} metric records waiting for "
                        f"{self.where}; dropping the oldest"
                    )
                return True
        return False

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for everything queued to be delivered; returns the
        number of calls left undelivered (abandoned, with a warning)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            left = len(self._queue)
            self._abandoned = True
            self._cond.notify_all()
        if left:
            warn(
                f"MLflow: {left} queued calls not delivered to {self.where} within "
                f"tracking.flush_timeout={timeout:g} s; they are lost (training is unaffected)"
            )
        return left

    # --- the delivery thread ------------------------------------------------------------------

    def _loop(self) -> None:
        client, delay = None, 0.25
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue or self._abandoned:
                    return
                call = self._queue[0]
                wait = self._held(call)
                if wait > 0:
                    self._cond.wait(wait)  # woken early by new calls and by closing
                    continue
                batch = call.records[:BATCH]
                self._flight = call
            try:
                if client is None:
                    client = self._connect()
                if call.name == "metrics":
                    self._send_metrics(client, batch)
                else:
                    call.fn(client)
            except Exception as e:
                if refused(e):
                    warn(f"MLflow: {self.where} refused {call.name}, skipped: {e}")
                    self._done(call, len(batch))
                    continue
                if not self.warned:
                    self.warned = True
                    warn(
                        f"MLflow: cannot reach {self.where} ({type(e).__name__}: "
                        f"{str(e)[:200]}); training goes on, records are kept and retried"
                    )
                with self._cond:
                    if self._abandoned:
                        return
                    self._cond.wait(delay)
                delay = min(2 * delay, self.max_backoff)
                continue
            delay = 0.25
            self._done(call, len(batch))

    def _held(self, head: _Call) -> float:
        """Seconds the head may still wait: metric records alone in the queue, not a full
        batch, younger than `hold`, and the outbox not closing."""
        if head.name != "metrics" or len(self._queue) > 1 or self._closing:
            return 0.0
        if len(head.records) >= BATCH:
            return 0.0
        return self.hold - (time.monotonic() - head.queued_at)

    def _done(self, call: _Call, n: int) -> None:
        with self._cond:
            self._flight = None
            if call.name == "metrics" and n < len(call.records):
                del call.records[:n]
            elif self._queue and self._queue[0] is call:
                self._queue.popleft()
                call.done.set()
            self._records -= n
