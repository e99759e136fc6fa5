"""pretrain-generate on a TP=2 checkpoint: the two ranks' model-state files are merged into one
TP=1 model, which must print exactly the sample the two-process run printed at its end.
Negative control: a model built from rank 0's shards alone does not load. That a wrong merge
order changes the model's output is shown on megatron-core's own shard layout, in process, by
tests/unit/test_model.py::test_merge_tp_shards_restores_the_full_model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ["--max-new-tokens", "12", "--temperature", "0.8", "--top-k", "40", "--seed", "1234"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_cli_merges_tensor_parallel_shards(tmp_path, small_dataset):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "pretrain.train",
        str(ROOT / "configs/tiny.yaml"),
        f"data.path={small_dataset}",
        f"run.output_dir={tmp_path}",
        "run.name=tp2",
        "run.train_steps=4",
        "run.eval_interval=0",
        "run.eval_batches=0",
        "run.sample_tokens=12",
        "run.sample_prompt=def",
        "optim.warmup_steps=2",
        "parallel.tp=2",
        "tracking.enabled=false",
    ]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The sample ends where the run's closing "wall time ..." line begins.
    sample = proc.stdout.split("sample:\n", 1)[1].split("\nwall time ", 1)[0].rstrip("\n")
    step = tmp_path / "tp2" / "checkpoints" / "step_00000004"
    assert (step / "mp_rank_01_model_states.pt").is_file()

    gen = [sys.executable, "-m", "pretrain.generate_cli", str(tmp_path / "tp2"), "--prompt", "def"]
    out = subprocess.run(gen + SAMPLE, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.rstrip("\n") == sample

    # Negative control: without rank 1's file the shards cannot make a whole model.
    (step / "mp_rank_01_model_states.pt").rename(step / "moved.pt")
    out = subprocess.run(gen + SAMPLE, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "mp_rank_01_model_states.pt" in out.stderr
