"""What a rank no longer imports at start-up (pretrain.startup_imports, data_pipeline.shards):
MLflow through DeepSpeed's autotuner, Inductor through megatron-core's compiled activations,
and pandas through pyarrow's dataset reader. Each check runs in a fresh interpreter (an import
happens once per process), next to a control showing that the same import without the measure
does load the module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def loaded(code: str, *modules: str) -> dict[str, bool]:
    """Which of `modules` are imported after `code` ran in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint([m in sys.modules for m in {list(modules)!r}])"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return dict(zip(modules, eval(out.strip().splitlines()[-1]), strict=True))


@pytest.mark.slow  # two fresh interpreters import DeepSpeed: about 8 s of CPU
def test_deepspeed_imports_without_mlflow_which_imports_afterwards():
    fixed = """
import sys
from pretrain.startup_imports import deepspeed_without_mlflow
with deepspeed_without_mlflow():
    import deepspeed
    from deepspeed.autotuning import autotuner
assert not autotuner.has_mlflow
assert "mlflow" not in sys.modules and "fastapi" not in sys.modules, "imported with DeepSpeed"
from mlflow import MlflowClient  # still imports afterwards: rank 0's tracking needs it
"""
    assert loaded(fixed, "deepspeed", "mlflow") == {"deepspeed": True, "mlflow": True}
    # Control: a plain `import deepspeed` imports MLflow (and FastAPI with it).
    assert loaded("import deepspeed", "mlflow", "fastapi") == {"mlflow": True, "fastapi": True}


@pytest.mark.slow  # two fresh interpreters import megatron-core: about 6 s of CPU
def test_megatron_imports_without_dynamo_and_compiles_on_first_call():
    fixed = """
import sys
import torch
compiles = []
def counting(model=None, **options):  # stands for torch.compile, counting its real calls
    compiles.append(options)
    return real(model, **options)
real, torch.compile = torch.compile, counting
from pretrain.startup_imports import megatron_without_dynamo
with megatron_without_dynamo():
    import megatron.core.tensor_parallel
    from megatron.core.fusions.fused_bias_gelu import bias_gelu
    @torch.compile(backend="eager")
    def f(x):
        return x * 2 + 1
assert torch.compile is counting, "torch.compile not restored after the block"
assert bias_gelu.__name__ == "bias_gelu" and compiles == []
assert "torch._dynamo" not in sys.modules and "torch._inductor.compile_fx" not in sys.modules
x = torch.arange(3.0)
assert torch.equal(f(x), x * 2 + 1) and torch.equal(f(x), x * 2 + 1)
assert compiles == [{"backend": "eager"}], compiles  # compiled on the first call, once
"""
    assert loaded(fixed, "torch._dynamo", "megatron.core") == {
        "torch._dynamo": True,
        "megatron.core": True,
    }
    # Control: a plain import of megatron-core imports TorchDynamo and Inductor.
    control = "import megatron.core.tensor_parallel"
    got = loaded(control, "torch._dynamo", "torch._inductor.compile_fx")
    assert got == {"torch._dynamo": True, "torch._inductor.compile_fx": True}


def test_reading_a_manifest_imports_no_pandas(tmp_path):
    from data_pipeline.shards import MANIFEST_FILE, ShardRecord, read_manifest, write_manifest

    rows = [ShardRecord("train", "train-000000.tar", 3, 120, "ab" * 32, 4096)]
    write_manifest(tmp_path / MANIFEST_FILE, rows)
    assert read_manifest(tmp_path) == rows
    code = f"from data_pipeline.shards import read_manifest\nread_manifest({str(tmp_path)!r})"
    assert loaded(code, "pandas", "pyarrow.dataset") == {"pandas": False, "pyarrow.dataset": False}
    # Control: pyarrow's read_table, which read_manifest used before, imports both.
    control = f"import pyarrow.parquet as pq\npq.read_table({str(tmp_path / MANIFEST_FILE)!r})"
    assert loaded(control, "pandas", "pyarrow.dataset") == {"pandas": True, "pyarrow.dataset": True}
