"""Imports kept off a rank's start-up.

`import deepspeed` imports its autotuner, which tries `import mlflow` for the autotuning
launcher's own logging (a feature this project never calls). Importing MLflow pulls in its GenAI
and gateway modules, FastAPI and pydantic: about a fifth of a tiny run's start-up on every rank,
tracking on or off (benchmarks/startup.py, docs/benchmarks.md). Our tracking imports the parts
of MLflow it uses, on rank 0 and only with tracking on (pretrain.tracking).

`import megatron.core` defines its fused activations with `torch.compile` as a decorator
(`megatron.core.jit.jit_fuser`), and that call imports TorchDynamo and Inductor (with sympy):
2.4 s of a one-process tiny run's 6.7 s of imports (`python -X importtime`, 2-core CPU), for
functions our models never call (they use megatron-core's tensor-parallel layers, not its
transformer). torch.compile compiles nothing before the first call anyway; only its imports
are eager. TorchDynamo still comes later (torch's optimizer imports it at its first
add_param_group), Inductor not: the rank's start-up is about 1.3 s shorter
(docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


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


@contextmanager
def megatron_without_dynamo() -> Iterator[None]:
    """While megatron-core is first imported inside this block, `torch.compile` applied to a
    function returns a wrapper that calls the real `torch.compile` with the same options on
    its first call: the same compiled function, with TorchDynamo imported only when one is
    used. `torch.compile` is itself again after the block; nothing changes when megatron-core
    is already imported."""
    import torch

    if "megatron.core" in sys.modules:
        yield
        return
    real = torch.compile
    torch.compile = _compile_on_first_call(real)  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = real


def _compile_on_first_call(real: Any) -> Any:
    def compile_later(model: Any = None, **options: Any) -> Any:
        if model is None:  # used as @torch.compile(...) with options
            return lambda fn: compile_later(fn, **options)
        if not inspect.isfunction(model):  # a module or other callable: as torch.compile
            return real(model, **options)
        compiled = None

        @functools.wraps(model)
        def first_call_compiles(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **options)
            return compiled(*args, **kwargs)

        return first_call_compiles

    return compile_later
