"""MLflow tracking, on rank 0 only.

The default store is a SQLite file beside the run directories, so nothing needs a server;
`tracking.uri` or MLFLOW_TRACKING_URI point elsewhere (a shared `mlflow server`, for example).
Artifacts of the default store go to `<output_dir>/mlartifacts`. The store is created or
migrated before the ranks start (pretrain.tracking_store).

Every call to the store goes through a queue drained by a background thread
(pretrain.tracking_outbox): a slow or absent store never slows or stops training.

Lineage: a resumed run reopens the MLflow run whose id its checkpoint carries, so one training
run is one MLflow run however many times it was preempted. A run started from another run's
checkpoint (another run directory) is a new MLflow run tagged `pretrain.branched_from_run`. A
sweep's runs are children (`mlflow.parentRunId`) of `tracking.parent_run_id`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from pretrain.config import Config


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(cfg.run.output_dir) / 'mlflow.db').resolve()}"


def ensure_experiment(cfg: Config, uri: str, client: Any = None) -> str:
    """The experiment's id, created if missing. Two processes creating it at once: the loser
    finds the winner's."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = client or MlflowClient(uri)
    name = cfg.tracking.experiment
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if uri.startswith("sqlite:"):
        artifacts = (Path(cfg.run.output_dir) / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except MlflowException:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str:
    """The source tree's commit, '+dirty' when it has uncommitted changes; 'unknown' outside
    a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def run_params(cfg: Config, layout: Any, global_batch: int) -> dict[str, str]:
    """The flattened config with every value the launch resolved (null: derived) filled in."""
    params = cfg.flatten()
    params.update(
        {
            "parallel.dp": layout.dp_size,
            "parallel.world_size": layout.world_size,
            "parallel.grad_accum": layout.grad_accum,
            "parallel.global_batch_size": global_batch,
        }
    )
    return {k: str(v)[:500] for k, v in params.items()}


def run_tags(cfg: Config, layout: Any, fingerprint: str) -> dict[str, str]:
    from pretrain.models.flops import param_count

    m = cfg.model
    tags = {
        "pretrain.git_commit": git_commit(),
        "pretrain.family": m.family,
        "pretrain.layout": (
            f"dp{layout.dp_size}-tp{layout.tp_size}-pp{layout.pp_size}-"
            f"zero{cfg.parallel.zero_stage}"
            + (f"-ep{cfg.parallel.ep}" if getattr(cfg.parallel, "ep", 1) > 1 else "")
        ),
        "pretrain.params": str(param_count(m)),
        "pretrain.params_non_embedding": str(param_count(m, embeddings=False)),
        "pretrain.dataset_fingerprint": fingerprint,
        "pretrain.host": socket.gethostname(),
    }
    tags["mlflow.source.git.commit"] = tags["pretrain.git_commit"].removesuffix("+dirty")
    tags.update(dict(t.split("=", 1) for t in cfg.tracking.tags))
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
    return tags


def step_metrics(trainer: Any, metrics: dict[str, Any]) -> dict[str, float]:
    """What a log step records: the step's numeric metrics, tokens seen, this process's peak
    memory (resident set; CUDA allocations on a GPU) and the model's own statistics (a
    `tracking_metrics()` method, e.g. an MoE model's expert load), on rank 0."""
    import resource

    import torch

    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool):
            out[k] = float(v)
    out["tokens_seen"] = float(trainer.state.consumed_tokens)
    out["memory_rss_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    device = trainer.layout.device
    if device.type == "cuda":
        out["memory_cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    report = getattr(getattr(trainer.engine, "module", None), "tracking_metrics", None)
    if callable(report):
        out.update({k: float(v) for k, v in report().items()})
    return out


START_WAIT = 15.0  # seconds a launch waits at most for its MLflow run to be opened


class Tracker:
    """Records params, metrics and artifacts; a no-op on ranks other than 0 or when disabled.
    Every method returns at once: the store is written by the outbox's thread."""

    def __init__(self, cfg: Config, active: bool):
        self.cfg = cfg
        self.active = active and cfg.tracking.enabled
        self.run_id: str | None = None
        self.uri = tracking_uri(cfg) if self.active else None
        self.outbox: Any = None

    def _connect(self) -> Any:
        from mlflow import MlflowClient

        from pretrain.tracking_store import prepare_store

        prepare_store(self.cfg)  # a no-op unless the store is a SQLite file not yet built
        return MlflowClient(self.uri)

    def _send_metrics(self, client: Any, records: list[Any]) -> None:
        client.log_batch(self.run_id, metrics=records, synchronous=True)

    def start(
        self,
        run_id: str | None,
        config_file: Path,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        branched_from: tuple[str | None, Path] | None = None,
    ) -> None:
        """Open a new MLflow run, or reopen `run_id` when resuming. `branched_from`: the run id
        and checkpoint a new run starts from."""
        if not self.active:
            return
        from pretrain.tracking_outbox import Outbox

        # MLflow's request retries and timeout come from the environment only: the entry point
        # sets them for the run (pretrain.environment.RUN_DEFAULTS), not this library code.
        self.outbox = Outbox(
            self._connect, self._send_metrics, self.uri, hold=self.cfg.tracking.metrics_interval
        )
        tags = dict(tags or {})
        if branched_from is not None:
            parent, ckpt = branched_from
            tags["pretrain.branched_from_checkpoint"] = str(ckpt.resolve())
            if parent:
                tags["pretrain.branched_from_run"] = parent
        self.run_id = run_id
        opened = self.outbox.call("start run", lambda client: self._open(client, tags))
        # A new run's id exists once the store has made it; waiting for that (briefly, and not
        # at all once the store is known to be unreachable) lets the first checkpoint carry it.
        deadline = time.monotonic() + START_WAIT
        while not opened.wait(0.05) and not self.outbox.warned and time.monotonic() < deadline:
            pass
        if run_id is None and params:
            # MLflow params are immutable, so they are logged once, when the run is created.
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow's limit of params per call
                chunk = items[i : i + 100]
                self.outbox.call(
                    "params", lambda c, chunk=chunk: c.log_batch(self.run_id, params=chunk)
                )
        self.outbox.call("config artifact", lambda c: c.log_artifact(self.run_id, str(config_file)))

    def _open(self, client: Any, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        if self.run_id is not None:
            try:
                client.update_run(self.run_id, status="RUNNING")
            except MlflowException as e:
                if getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                # The checkpoint came from another store: its run id means nothing here.
                tags = {**tags, "pretrain.lost_run_id": self.run_id}
                self.run_id = None
        if self.run_id is None:
            experiment = ensure_experiment(self.cfg, self.uri, client)
            run = client.create_run(experiment, run_name=self.cfg.run.name, tags=tags)
            self.run_id = run.info.run_id
        else:  # tags can change between launches (commit, host, layout)
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.outbox is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.outbox.metrics([Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: Path) -> None:
        """A file of the run (e.g. the MoE expert-load plot) as an artifact, queued."""
        if self.outbox is not None:
            self.outbox.call(path.name, lambda c: c.log_artifact(self.run_id, str(path)))

    def finish(
        self, status: str = "FINISHED", plot_to: Path | None = None, timeout: float | None = None
    ) -> None:
        """End the run: a loss-curve PNG (written to `plot_to`) as an artifact, the status, then
        up to `timeout` seconds (default `tracking.flush_timeout`) for the queue to drain."""
        if self.outbox is None:
            return
        if plot_to is not None:
            self.outbox.call("loss curve", lambda c: self._plot(c, plot_to))
        self.outbox.call("end run", lambda c: c.set_terminated(self.run_id, status))
        self.outbox.close(self.cfg.tracking.flush_timeout if timeout is None else timeout)
        self.outbox = None

    def _plot(self, client: Any, path: Path) -> None:
        """From the store's history, so a resumed run's curve covers all its launches."""
        from pretrain.loss_curve import plot_loss_curve

        curves = {
            key: [(m.step, m.value) for m in client.get_metric_history(self.run_id, key)]
            for key in ("loss", "val_loss")
        }
        plot_loss_curve(curves, path, title=self.cfg.run.name)
        client.log_artifact(self.run_id, str(path))
