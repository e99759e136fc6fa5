"""Loader worker processes end with their parent, whatever the parent's signal handlers and
however it ends: closed while the workers are busy, or killed outright."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A parent with the trainer's kind of SIGTERM handler (it records, it does not exit), whose
# workers are stuck in a task: it prints the worker pids, then closes them (or waits to be
# killed).
PARENT = """
import signal, sys, threading, time
from data_pipeline.workers import OrderedWorkers

signal.signal(signal.SIGTERM, lambda *args: None)


def stuck(task):
    time.sleep(600)


workers = OrderedWorkers(stuck, 2)
workers.start(iter(range(100)))
threading.Thread(target=workers.next, daemon=True).start()
time.sleep(0.5)
print(" ".join(str(p.pid) for p in workers._processes), flush=True)
if sys.argv[1] == "close":
    workers.close()
    print("closed", flush=True)
else:
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(mode: str) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PARENT, mode],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    return proc, pids


def _gone_within(pids: list[int], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_close_ends_busy_workers_despite_the_parents_sigterm_handler():
    proc, pids = _start("close")
    try:
        # close() waits 5 s for a polite exit, then terminates; the process then exits.
        assert proc.wait(timeout=40) == 0
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the parent hung at exit waiting for its loader workers")
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.stdout.read().strip() == "closed"
    assert _gone_within(pids, 5)


def test_workers_die_with_a_killed_parent():
    proc, pids = _start("wait")
    proc.kill()
    proc.wait(timeout=10)
    try:
        # Busy in a task, the worker never gets to its own parent check: the kernel's death
        # signal (prctl PDEATHSIG) ends it.
        assert _gone_within(pids, 5)
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
