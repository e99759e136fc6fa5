"""Settings that DeepSpeed and MLflow read only from environment variables, and their scope.

Library code never changes `os.environ` for good: what a library takes as an argument is passed
as one (pretrain.distributed gives torch.distributed its rendezvous explicitly), and what it
reads only from the environment is set by `environ_defaults` for a block and removed afterwards.
The settings a whole training run needs (DeepSpeed's engine reads LOCAL_RANK while it trains,
MLflow reads its request settings at every request) are set that way by the entry point,
pretrain.train.main, around the run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

# What pretrain-train sets for its run where the environment does not say otherwise.
RUN_DEFAULTS = {
    # The tracking outbox retries on its own terms; MLflow's default (7 retries with backoff,
    # minutes) would hold every queued record behind one dead request (pretrain.tracking).
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # MLflow sets its logger's level when imported, from this variable (default INFO).
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}


@contextlib.contextmanager
def environ_defaults(values: Mapping[str, str]) -> Iterator[None]:
    """Set each of `values` the environment lacks for the block, then remove it again; a
    variable the environment already has keeps its value (the user's choice wins)."""
    added = [name for name in values if name not in os.environ]
    for name in added:
        os.environ[name] = values[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def single_process_world() -> dict[str, str]:
    """torchrun's rank variables for a world of one, or nothing under a launcher (RANK set):
    lets `python -m pretrain.train` and the benchmarks run without torchrun."""
    if "RANK" in os.environ:
        return {}
    # No MASTER_ADDR/MASTER_PORT: pretrain.distributed then rendezvouses on a port its store
    # binds itself (a port picked here would be free now and maybe taken by the time it binds).
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
