"""Errors for bad user input outside the config (config errors are pretrain.config.ConfigError).

Kept free of heavy imports so entry points can catch them before torch is loaded.
"""


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names it and the fix."""
