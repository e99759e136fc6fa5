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

    from data_pipeline.errors import DataError
    from pretrain.config import ConfigError

    args = parse_args(argv)
    try:
        text = run(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0
