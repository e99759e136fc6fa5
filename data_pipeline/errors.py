"""The one exception type for bad data input."""


class DataError(ValueError):
    """Bad input data, a bad dataset directory or bad builder settings.

    The message names the offending file, shard or value and says how to fix it, so the
    command line can print it as a single line without a traceback.
    """
