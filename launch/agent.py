"""`python -m launch.agent [torchrun options] -m pretrain.train CONFIG [overrides]`: torchrun,
with a requested stop that ends in exit 0.

torchrun's own handler turns SIGTERM, SIGINT and SIGHUP into an exception: it signals the ranks,
waits at most its shutdown timeout (30 s) for them, and exits 1 with a traceback, even when every
rank saved and exited 0. Slurm, a job scheduler or a user who runs torchrun without
pretrain-launch sends the signal to torchrun itself, so that is where it has to be handled.

This entry point is torchrun (same options, same process: the elastic agent), except that
torchrun handles only SIGQUIT and the stop signals are ours:

- the first SIGTERM, SIGINT, SIGUSR1 or SIGHUP (unless ignored, as under nohup) is passed to
  every rank once its stop handler is in place (launch.supervise.pass_on); the ranks save at the
  next step boundary and exit 0, so torchrun exits 0. SIGINT and SIGHUP reach the ranks as
  SIGTERM: a rank takes a second SIGINT as "stop at once", and a scheduler that signals every
  process of the job (Slurm's process tracking) would deliver it twice.
- a second one kills every process below the agent at once (no save) and exits 128 + signal.

`pretrain-launch` (launch.supervise) runs this same command in a session of its own and signals
the ranks itself; the agent then never sees a signal.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from launch.supervise import POLL_S, descendants, kill, pass_on
from pretrain.lifecycle import ignore_stop_signals

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# What torchrun still handles itself: a quit asks for no save.
TORCHRUN_SIGNALS = "SIGQUIT"


class AgentStop:
    """This process's stop-signal handling; see the module docstring."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self.signalled: set[int] = set()  # ranks the request reached
        self.wake = threading.Event()
        hup = [signal.SIGHUP] if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN else []
        for sig in (*STOP_SIGNALS, *hup):
            signal.signal(sig, self._on_signal)
        threading.Thread(target=self._pass_on, daemon=True, name="stop-forwarder").start()

    def _on_signal(self, signum: int, frame) -> None:
        if self.requested is not None:
            kill(descendants(os.getpid()))
            os._exit(128 + signum)
        self.requested = signum
        self.wake.set()  # the thread prints: a handler that writes to stderr may interrupt a write

    def _pass_on(self) -> None:
        """Until the process ends: ranks that start after the request get it once they can."""
        self.wake.wait()
        print(
            f"launch.agent: {signal.Signals(self.requested).name}: the ranks save at the next "
            f"step and stop (signal again to stop at once, without saving)",
            file=sys.stderr,
            flush=True,
        )
        sig = signal.SIGUSR1 if self.requested == signal.SIGUSR1 else signal.SIGTERM
        while True:
            pass_on(os.getpid(), sig, self.signalled)
            time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stop = AgentStop()
    from torch.distributed import run as torchrun

    # First, so that a --signals-to-handle the user gives still wins (argparse: the last one).
    torchrun.main([f"--signals-to-handle={TORCHRUN_SIGNALS}", *argv])
    if stop.requested is not None:
        print(
            f"launch.agent: stopped after {signal.Signals(stop.requested).name}",
            file=sys.stderr,
            flush=True,
        )
    return 0


if __name__ == "__main__":
    # A late copy of the signal (Slurm signals every process of the step) must not turn the
    # exit code into death by signal while the interpreter shuts down.
    code = main()
    ignore_stop_signals()
    sys.exit(code)
