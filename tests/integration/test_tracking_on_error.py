"""A run that fails with an exception keeps what it logged: metric records the MLflow outbox is
still holding (tracking.metrics_interval) reach the store before the process exits, and the
MLflow run ends as FAILED, not left RUNNING.

One launch of the tiny config with an exception injected at step 5 (reliability.inject
error@5), a metric record every step and a hold far longer than the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_a_failed_run_delivers_its_held_metrics_and_ends_failed(tmp_path, small_dataset):
    from mlflow import MlflowClient

    out = tmp_path / "runs"
    proc = subprocess.run(
        [
            str(BIN / "pretrain-train"),
            str(ROOT / "configs" / "tiny.yaml"),
            f"data.path={small_dataset}",
            f"run.output_dir={out}",
            "run.train_steps=10",
            "run.log_interval=1",
            "run.eval_interval=0",
            "optim.warmup_steps=1",
            "run.sample_tokens=0",
            "tracking.metrics_interval=600",  # held for the whole run unless flushed
            "reliability.inject=[error@5]",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode != 0
    assert "reliability.inject: error at step 5" in proc.stderr, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pretrain").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert run.info.status == "FAILED"
