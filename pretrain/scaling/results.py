"""A sweep's finished runs, read back from MLflow: the children of its parent run."""

from __future__ import annotations

from typing import Any

from pretrain.scaling.fits import Observation


def read_observations(uri: str, parent_run_id: str, metric: str = "val_loss") -> list[Observation]:
    """One observation per point: its newest FINISHED child run's last `metric` (falling back
    to the train `loss` for runs without a validation split). Runs of interrupted launches of
    the same point (status RUNNING, KILLED, FAILED) are ignored."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        max_results=50_000,
    )
    best: dict[str, Any] = {}
    for r in runs:
        point = r.data.tags.get("sweep.point")
        if point is None or r.info.status != "FINISHED":
            continue
        if point not in best or r.info.end_time > best[point].info.end_time:
            best[point] = r
    out = []
    for point, r in sorted(best.items()):
        t, m = r.data.tags, r.data.metrics
        loss = m.get(metric, m.get("loss"))
        if loss is None:
            continue
        out.append(
            Observation(
                point=point,
                N=float(t["sweep.N"]),
                D=float(t["sweep.D"]),
                C=float(t["sweep.C"]),
                loss=float(loss),
                budget=float(t["sweep.budget"]) if t.get("sweep.budget_kind") == "flops" else None,
            )
        )
    return out
