"""torchrun as the launcher's child: signals reach every rank, nothing outlives the run.

torchrun runs in a session of its own, so the terminal's Ctrl-C reaches only the launcher, which
decides what it means:

- the first SIGINT, SIGTERM or SIGUSR1 (or SIGHUP, as SIGTERM, unless the launcher was started
  under nohup) is passed to every rank (torchrun's children). The ranks
  save at the next step boundary and exit 0, so torchrun exits 0; its own handler, which kills
  the ranks and exits 1 with a traceback, never sees the signal. A rank that has not yet set up
  its stop handler (still starting) is signalled as soon as it has: until then the signal would
  kill it.
- a second one kills the whole process tree at once (no save).

The launcher is a child subreaper (Linux), so a process of the run whose parent died (a loader
worker of a killed rank) is re-parented to it rather than to init; whatever is left when
torchrun has exited is killed, so no process of the run outlives the launcher.

torchrun's own log lines (glog-style `W1130 12:00:00.000 ...`, its ChildFailedError report) are
held back: a run whose ranks explained their failure (`error:` lines, see pretrain.lifecycle)
or that stopped as asked does not need them; an unexplained failure prints them.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pretrain.lifecycle import ERROR_FILE_ENV, LAUNCH_TIME_ENV

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
PR_SET_CHILD_SUBREAPER = 36  # prctl(2)
POLL_S = 0.1
AGENT_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ")


def _ppid_table() -> dict[int, int]:
    """{pid: parent pid} of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        table[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return table


def children(pid: int) -> list[int]:
    return sorted(p for p, parent in _ppid_table().items() if parent == pid)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before children."""
    table = _ppid_table()
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in table.items() if parent in frontier]
        out += kids
        frontier = kids
    return out


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (SigCgt in /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def _has_env(pid: int, entry: str) -> bool:
    try:
        return entry.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def pass_on(parent: int, sig: int, signalled: set[int]) -> None:
    """Send `sig` to each child of `parent` (the ranks of a torchrun agent) whose stop handler
    is in place and that has not had it yet; those signalled are added to `signalled`."""
    for pid in children(parent):
        # The ranks catch SIGTERM only once their stop handler is set (Python leaves it
        # at its default); before that a signal would kill the rank or raise in it.
        if pid not in signalled and catches(pid, signal.SIGTERM):
            try:
                os.kill(pid, sig)
                signalled.add(pid)
            except ProcessLookupError:
                pass


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _become_subreaper() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
    except (OSError, AttributeError):
        pass


class Supervisor:
    """Runs one torchrun command to its end; see the module docstring."""

    def __init__(self, cmd: list[str], env: dict[str, str]):
        self.cmd, self.env = cmd, env
        self.requested: int | None = None  # the first stop signal
        self.killed: int | None = None  # the second one
        self.signalled: set[int] = set()  # ranks the stop request reached
        self.held: list[str] = []  # torchrun's own lines
        self.proc: subprocess.Popen | None = None

    def _on_signal(self, signum: int, frame) -> None:
        if self.requested is None:
            self.requested = signum
            name = signal.Signals(signum).name
            print(
                f"pretrain-launch: {name}: the ranks save at the next step and stop "
                f"(press Ctrl-C again to stop at once, without saving)",
                file=sys.stderr,
                flush=True,
            )
        elif self.killed is None:
            self.killed = signum
            self._kill_tree()

    def _forward(self) -> None:
        """Pass the stop request to each rank whose stop handler is in place."""
        if self.requested is None or self.killed is not None or self.proc is None:
            return
        # The ranks stop on SIGTERM, SIGUSR1 and SIGINT; a hang-up asks as SIGTERM.
        sig = signal.SIGTERM if self.requested == signal.SIGHUP else self.requested
        pass_on(self.proc.pid, sig, self.signalled)

    def _kill_tree(self) -> None:
        if self.proc is None:
            return
        kill([self.proc.pid, *descendants(self.proc.pid)])

    def _relay(self, stream) -> None:
        """Ranks' stderr lines to ours as they come; torchrun's own lines held back."""
        agent_block = False
        for line in iter(stream.readline, ""):
            if AGENT_LINE.match(line):
                agent_block = agent_block or "failed (exitcode" in line
                self.held.append(line)
            elif agent_block:  # the ChildFailedError report that follows
                self.held.append(line)
            else:
                sys.stderr.write(line)
                sys.stderr.flush()

    def run(self) -> int:
        _become_subreaper()
        with tempfile.TemporaryDirectory(prefix="pretrain-launch-") as tmp:
            error_file = Path(tmp) / "error.json"
            env = {**self.env, ERROR_FILE_ENV: str(error_file)}
            env.setdefault(LAUNCH_TIME_ENV, repr(time.time()))
            # A closed terminal (SIGHUP) stops the run like Ctrl-C, unless it is ignored
            # (nohup), as it would be for torchrun in the launcher's session.
            hup = [signal.SIGHUP] if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN else []
            previous = {s: signal.signal(s, self._on_signal) for s in (*STOP_SIGNALS, *hup)}
            try:
                self.proc = subprocess.Popen(
                    self.cmd, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True
                )
                relay = threading.Thread(target=self._relay, args=(self.proc.stderr,), daemon=True)
                relay.start()
                while self.proc.poll() is None:
                    self._forward()
                    time.sleep(POLL_S)
                relay.join(timeout=5)
                self._reap_leftovers(f"{ERROR_FILE_ENV}={error_file}")
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
            return self._exit_code(self.proc.returncode, error_file)

    def _reap_leftovers(self, marker: str) -> None:
        """Kill what is left of the run: processes re-parented to us (the subreaper) that carry
        this launch's `marker` in their environment (a caller's other children are not ours)."""
        for _ in range(50):
            left = [p for p in descendants(os.getpid()) if _has_env(p, marker)]
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass
            time.sleep(POLL_S)

    def _exit_code(self, rc: int, error_file: Path) -> int:
        if self.killed is not None:
            return 128 + self.killed
        if error_file.is_file():  # a rank printed why: torchrun's report adds nothing
            try:
                return int(json.loads(error_file.read_text())["code"])
            except (OSError, ValueError, KeyError):
                return rc or 1
        if rc != 0:  # unexplained: torchrun's report is all there is
            sys.stderr.writelines(self.held)
        if self.requested is not None and rc == 0:
            print(
                f"pretrain-launch: stopped after {signal.Signals(self.requested).name}",
                file=sys.stderr,
            )
        return rc


def run(cmd: list[str], env: dict[str, str]) -> int:
    """Run torchrun `cmd` with `env` under a Supervisor; its exit code: 0 after a requested
    stop that saved, 2 when a rank reported bad input, 128+N after a second signal N."""
    return Supervisor(cmd, env).run()
