"""A rank's life as the user sees it: stop requests during start-up, one line per error, a quiet
console, and the time spent starting.

Free of heavy imports: the entry point sets these up before torch loads.

- `StopSignals`: from the first line of `main()`, SIGTERM, SIGUSR1 and SIGINT are recorded
  rather than killing the rank, so a stop asked for while it starts (the launcher passes it on
  as soon as the rank catches SIGTERM, see launch.supervise) is honoured at the first step
  boundary, with a save, like one that arrives later (the trainer's ExitHook takes it over).
- `ignore_stop_signals`: a process's last step once its exit code is decided, so a late
  duplicate of the stop signal cannot turn that code into death by signal.
- `report_error`: one `error:` line for the whole run. Under pretrain-launch the first rank
  that fails claims the error file the launcher named (PRETRAIN_ERROR_FILE) and prints; the
  others stay quiet, and the launcher leaves out torchrun's failure report.
- `route_warnings`: warnings raised in third-party code (Transformer Engine/Apex fallbacks,
  deprecations inside DeepSpeed) go to train.log, not the console; ours still print.
- `StartupClock`: launch-to-first-step time by phase, for the start-up line and the summary.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, TextIO

ERROR_FILE_ENV = "PRETRAIN_ERROR_FILE"  # launch.supervise sets it
LAUNCH_TIME_ENV = "PRETRAIN_LAUNCH_TIME"
OUR_PACKAGES = ("pretrain", "data_pipeline", "launch")
# Loggers of libraries that print INFO lines on every launch (MLflow's store migrations).
CHATTY_LOGGERS = ("mlflow", "alembic")


class StopSignals:
    """Records the first stop signal until the trainer's own handler takes over."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.signalled: str | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = self.signalled or signal.Signals(signum).name


def ignore_stop_signals() -> None:
    """Ignore SIGTERM and SIGUSR1 from here to the process's end: for the entry points of
    ranks and agents once they have their exit code.

    Python puts its signal handlers back to the default while the interpreter shuts down, and
    a stop signal often comes more than once: Slurm's process tracking signals every process
    of the job step while the agent and the job script pass it on as well. A copy arriving
    after a rank saved and returned 0 would kill it during shutdown; torchrun, the agent and
    the batch script then see a failed rank, and a preempted job is not requeued. Ignored
    (unlike caught) signals also survive exec, so this is for exiting processes only. SIGINT
    is left alone: Ctrl-C still ends a shutdown that hangs."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _claim(path: str, code: int, line: str) -> bool:
    """Create the run's error file; False when another rank already has."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    except OSError:
        return True  # no usable file: print anyway, a duplicate line beats none
    with os.fdopen(fd, "w") as f:
        json.dump({"code": code, "line": line}, f)
    return True


def someone_reported() -> bool:
    """Whether a rank of this launch has already explained a failure."""
    path = os.environ.get(ERROR_FILE_ENV)
    return bool(path) and Path(path).is_file()


def reported_code() -> int | None:
    """The exit code of the failure a rank of this launch explained, if any."""
    path = os.environ.get(ERROR_FILE_ENV)
    try:
        return int(json.loads(Path(path).read_text())["code"]) if path else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def report_error(message: str, rank: int, code: int, same_on_every_rank: bool) -> int:
    """Print `error: message` once for the run and return `code`. An error every rank finds
    alike (input checked before the process group) is printed by rank 0; one found by some
    ranks only (a corrupt shard one rank reads) by the first of them."""
    line = f"error: {message}"
    path = os.environ.get(ERROR_FILE_ENV)
    if same_on_every_rank and rank != 0:
        return code
    if path is None or _claim(path, code, line):
        print(line, file=sys.stderr, flush=True)
    return code


def report_crash(exc: BaseException, rank: int, log_path: Path | None) -> int:
    """An unexpected exception: its traceback goes to train.log, one line to the console
    (unless another rank has already explained the failure, which likely caused this one).
    Returns the exit code, 1."""
    text = "".join(traceback.format_exception(exc))
    where = "the console"
    if log_path is not None:
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} rank {rank}: {text}")
            where = str(log_path)
        except OSError:
            log_path = None
    if someone_reported():
        return 1
    summary = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    line = f"unexpected {type(exc).__name__} on rank {rank}: {summary}; traceback in {where}"
    report_error(line, rank, 1, same_on_every_rank=False)
    if log_path is None:
        print(text, file=sys.stderr, flush=True)
    return 1


class WarningLog:
    """Third-party warnings kept until train.log exists (rank 0), then appended to it."""

    def __init__(self) -> None:
        self.pending: list[str] = []
        self.file: TextIO | None = None

    def write(self, text: str) -> None:
        if self.file is None:
            self.pending.append(text)
            return
        self.file.write(text)
        self.file.flush()

    def attach(self, path: Path | None) -> None:
        """Send kept and later warnings to `path` (None: drop them, as on ranks other than 0,
        which raise the same warnings)."""
        if path is None:
            self.pending.clear()
            self.write = lambda text: None  # type: ignore[method-assign]
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a")
        for text in self.pending:
            self.file.write(text)
        self.pending.clear()
        self.file.flush()


def _is_ours(filename: str) -> bool:
    parts = Path(filename).parts
    return "site-packages" not in parts and any(p in parts for p in OUR_PACKAGES)


def route_warnings() -> WarningLog:
    """Install the warning router for this process; see the module docstring."""
    sink = WarningLog()
    console = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if _is_ours(filename):
            console(message, category, filename, lineno, file, line)
        else:
            sink.write(
                f"{time.strftime('%Y-%m-%d %H:%M:%S')} warning: "
                + warnings.formatwarning(message, category, filename, lineno, line)
            )

    warnings.showwarning = show
    # MLflow's own level at its import comes from MLFLOW_LOGGING_LEVEL, which the entry point
    # sets (pretrain.environment.RUN_DEFAULTS); this covers an MLflow imported before.
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return sink


class StartupClock:
    """Wall time from launch (the launcher's clock, else this process's start) by phase."""

    def __init__(self) -> None:
        self.launch = float(os.environ.get(LAUNCH_TIME_ENV) or _process_start())
        self.last = self.launch
        self.phases: list[tuple[str, float]] = []

    def mark(self, phase: str) -> None:
        """End `phase` now."""
        now = time.time()
        self.phases.append((phase, now - self.last))
        self.last = now

    def since_launch(self) -> float:
        return time.time() - self.launch

    def line(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.phases)
        return f"start-up: {self.last - self.launch:.1f} s from launch to the first step ({parts})"


def _process_start() -> float:
    """This process's start as time.time(), from /proc (Linux); now elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()
