"""Imports kept off a rank's start-up.

`import deepspeed` imports its autotuner, which tries `import mlflow` for the autotuning
launcher's own logging (a feature this project never calls). Importing MLflow pulls in its GenAI
and gateway modules, FastAPI and pydantic: about a fifth of a tiny run's start-up on every rank,
tracking on or off (benchmarks/startup.py, docs/benchmarks.md). Our tracking imports the parts
of MLflow it uses, on rank 0 and only with tracking on (pretrain.tracking).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def deepspeed_without_mlflow() -> Iterator[None]:
    """While DeepSpeed is first imported inside this block, `import mlflow` fails (its
    autotuner catches that and goes without MLflow); afterwards MLflow imports as usual.
    Nothing changes when either is already imported."""
    if "mlflow" in sys.modules or "deepspeed" in sys.modules:
        yield
        return
    sys.modules["mlflow"] = None  # type: ignore[assignment]  # a None entry: ImportError
    try:
        yield
    finally:
        if "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
