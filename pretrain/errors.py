"""Errors for bad user input outside the config (config errors are pretrain.config.ConfigError).

Kept free of heavy imports so entry points can catch them before torch is loaded.
"""

from collections.abc import Callable
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names it and the fix."""


def run_cli(parse_args: Callable[[Any], Any], run: Callable[[Any], str], argv: Any) -> int:
    """A one-shot command's main(): print what `run` returns (exit 0), or bad user input as
    one `error:` line on stderr (exit 2)."""
    import sys
    import warnings

    from data_pipeline.errors import DataError
    from pretrain.config import ConfigError
    from pretrain.lifecycle import route_warnings

    args = parse_args(argv)
    # Third-party warnings (megatron's Transformer Engine / Apex fallbacks) say nothing to the
    # user of a one-shot command, which has no train.log to keep them in: dropped; ours print.
    previous = warnings.showwarning
    route_warnings().attach(None)
    try:
        text = run(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = previous
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # The reader went away (`pretrain-ckpt inspect ... | head`): what it wanted it has.
        # Python would report the pipe again when it flushes stdout at exit; point that at
        # /dev/null instead (the recipe of Python's signal module docs).
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
