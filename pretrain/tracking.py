"""MLflow tracking, on rank 0 only.

The default store is a SQLite file beside the run directories, so nothing needs a server;
`tracking.uri` or MLFLOW_TRACKING_URI point elsewhere (a shared `mlflow server`, for example).
Artifacts of the default store go to `<output_dir>/mlartifacts`. A resumed run reopens the MLflow
run whose id its checkpoint carries, so one training run is one MLflow run however many times it
was preempted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pretrain.config import Config


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(cfg.run.output_dir) / 'mlflow.db').resolve()}"


def ensure_experiment(cfg: Config, uri: str) -> str:
    """Create the store and the experiment if missing; the experiment's name. Job array tasks
    call this once each under a file lock before training (launch.tracking_store), since two
    processes creating one SQLite store or experiment at the same time fail."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    name = cfg.tracking.experiment
    if mlflow.get_experiment_by_name(name) is None:
        artifacts = None
        if uri.startswith("sqlite:"):
            artifacts = (Path(cfg.run.output_dir) / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(name, artifact_location=artifacts)
    return name


class Tracker:
    """Records params, metrics and artifacts; a no-op on ranks other than 0 or when disabled."""

    def __init__(self, cfg: Config, active: bool):
        self.cfg = cfg
        self.active = active and cfg.tracking.enabled
        self.run_id: str | None = None
        self.uri = tracking_uri(cfg) if self.active else None
        self._mlflow: Any = None

    def start(self, run_id: str | None, config_file: Path) -> None:
        """Open a new MLflow run, or reopen `run_id` when resuming."""
        if not self.active:
            return
        import mlflow

        self._mlflow = mlflow
        name = ensure_experiment(self.cfg, self.uri)
        mlflow.set_experiment(name)
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else self.cfg.run.name)
        self.run_id = run.info.run_id
        if run_id is None:
            # MLflow params are immutable, so they are logged once, when the run is created.
            mlflow.log_params({k: str(v)[:500] for k, v in self.cfg.flatten().items()})
        mlflow.log_artifact(str(config_file))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.active and self._mlflow is not None:
            self._mlflow.log_metrics(metrics, step=step)

    def finish(self, status: str = "FINISHED") -> None:
        if self.active and self._mlflow is not None:
            self._mlflow.end_run(status=status)
            self._mlflow = None
