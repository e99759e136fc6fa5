"""pretrain-generate on pipeline checkpoints: the stages' per-layer files are read back into one
whole model under the one-process names. The same run trained at PP=2 and at PP=1 (same global
batch, same seed) must load to the same weights, and generate the same text; a wrong layer-to-
block mapping (the negative control) must not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
COMMON = [
    "run.train_steps=4",
    "run.eval_interval=0",
    "run.eval_batches=0",
    "optim.warmup_steps=2",
    "parallel.micro_batch_size=2",
    "parallel.global_batch_size=4",
    "model.n_layers=3",  # an odd number of blocks: stages of unequal size
    "parallel.pipeline_partition=parameters",
    "tracking.enabled=false",
]


def train(tmp: Path, data: str, config: str, name: str, pp: int, *extra: str) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={pp}",
        "-m",
        "pretrain.train",
        str(ROOT / config),
        f"data.path={data}",
        f"run.output_dir={tmp}",
        f"run.name={name}",
        f"parallel.pp={pp}",
        *COMMON,
        *extra,
    ]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_dataset):
    tmp = tmp_path_factory.mktemp("pipe_gen")
    untied = ("model.tie_embeddings=false",)
    return {
        "gpt_pp2": train(tmp, small_dataset, "configs/tiny.yaml", "gpt_pp2", 2, *untied),
        "gpt_pp1": train(tmp, small_dataset, "configs/tiny.yaml", "gpt_pp1", 1, *untied),
        "t5_pp2": train(tmp, small_dataset, "configs/tiny_t5.yaml", "t5_pp2", 2),
        "t5_pp1": train(tmp, small_dataset, "configs/tiny_t5.yaml", "t5_pp1", 1),
    }


@pytest.fixture(scope="module", autouse=True)
def _one_process_world_ends_with_the_module():
    """load_model starts a world of one in this process when none exists; one this module
    started ends with it (later tests expect none), one that existed before (another module's
    session fixture) is left alone."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    existed = dist.is_initialized(), ps.model_parallel_is_initialized()
    yield
    if not existed[1] and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if not existed[0] and dist.is_initialized():
        dist.destroy_process_group()


def weights(run_dir: Path) -> dict:
    from pretrain.generate_cli import load_model

    model, _ = load_model(run_dir)
    # megatron's layers put `_extra_state: None` entries into state_dict(): weights only.
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def worst_difference(a: dict, b: dict) -> float:
    """The largest absolute difference of any weight. Absolute, not relative: the attention's
    key bias has a true gradient of exactly zero (it shifts every score of a query alike), so
    its gradient is rounding noise that Adam scales up to moves of ~1e-6 whose sign depends on
    the order of the sums (measured 1.4e-6, on biases of size 9e-3)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_pipeline_checkpoint_loads_the_same_model(runs, family):
    assert (
        runs[f"{family}_pp2"] / "checkpoints/step_00000004/layer_03-model_00-model_states.pt"
    ).is_file()
    pp2, pp1 = weights(runs[f"{family}_pp2"]), weights(runs[f"{family}_pp1"])
    # The two runs differ only in how the sums of a step are ordered (fp32, 4 steps).
    assert worst_difference(pp2, pp1) < 1e-5


def test_wrong_layer_mapping_is_caught(runs, monkeypatch):
    """Negative control: the PP=2 checkpoint read with blocks 0 and 1 swapped loads (same
    shapes) but is not the model the PP=1 run trained."""
    from pretrain.models import pipeline

    real = pipeline.layer_name_maps

    def swapped(specs):
        maps = real(specs)
        blocks = [i for i, m in enumerate(maps) if m("block.x").startswith("blocks.")]
        maps[blocks[0]], maps[blocks[1]] = maps[blocks[1]], maps[blocks[0]]
        return maps

    monkeypatch.setattr(pipeline, "layer_name_maps", swapped)
    assert worst_difference(weights(runs["gpt_pp2"]), weights(runs["gpt_pp1"])) > 1e-2


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_cli_generates_from_a_pipeline_checkpoint(runs, family):
    gen = [sys.executable, "-m", "pretrain.generate_cli", "--prompt", "def", "--max-new-tokens"]
    outs = []
    for run in (runs[f"{family}_pp2"], runs[f"{family}_pp1"]):
        out = subprocess.run(
            [*gen, "12", str(run)], env=ENV, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-3000:]
        outs.append(out.stdout)
    assert outs[0] == outs[1]
