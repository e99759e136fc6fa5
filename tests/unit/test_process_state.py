"""Library code leaves the process as it found it: signal handlers it installs for a run are
restored when the run ends."""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def test_exit_hook_restores_the_signal_handlers():
    from pretrain.trainer import ExitHook

    def ours(signum, frame):  # a handler the embedding program installed itself
        pass

    saved = {s: signal.signal(s, ours) for s in SIGNALS}
    try:
        hook = ExitHook(start_step=0)
        # During the run the hook records stop signals (so the run saves and stops)...
        assert all(signal.getsignal(s) == hook._on_signal for s in SIGNALS)
        hook.at_end(trainer=None)
        # ...and afterwards the program's own handlers are back.
        assert all(signal.getsignal(s) is ours for s in SIGNALS)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
