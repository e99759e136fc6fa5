"""Running a sweep: its MLflow parent run, one config file per point, and either a local
sequential run (resumable: finished points are skipped, an interrupted one resumes from its
checkpoints) or Slurm job arrays (launch.slurm).

Every point is an ordinary training run: `pretrain.train <sweep dir>/configs/<point>.yaml`,
in run directory <sweep dir>/<sweep>-<point>, an MLflow child of the sweep's parent run tagged
with the sweep name, the point id and its N, D and C (tracking.parent_run_id, tracking.tags).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pretrain.config import Config, from_dict
from pretrain.scaling import done
from pretrain.scaling.done import DONE_FILE, tag_for
from pretrain.scaling.spec import Point, Spec, size_config

PARENT_FILE = "parent_run_id"


def run_name(spec: Spec, pt: Point) -> str:
    return f"{spec.name}-{pt.id}"


def point_cfg(spec: Spec, pt: Point, parent_run_id: str | None) -> Config:
    shape = next(s for s in spec.shapes if s["name"] == pt.size)
    data = size_config(spec, shape, pt.steps).to_dict()
    data["run"].update(name=run_name(spec, pt), output_dir=str(spec.sweep_dir), resume="auto")
    data["checkpoint"]["dir"] = None  # one checkpoint directory per point, in its run directory
    if pt.branch_of is not None:
        source = spec.point(pt.branch_of)
        data["run"]["branch_from"] = str(
            spec.sweep_dir / run_name(spec, source) / "checkpoints" / tag_for(pt.branch_step)
        )
    if pt.save_every:
        data["checkpoint"].update(interval=pt.save_every, keep_every=pt.save_every)
    tags = {
        "sweep": spec.name,
        "sweep.point": pt.id,
        "sweep.size": pt.size,
        "sweep.N": pt.N,
        "sweep.D": pt.D,
        "sweep.C": f"{pt.C:.6e}",
        "sweep.budget": f"{pt.budget:.6e}",
        "sweep.budget_kind": spec.budget_kind,
    }
    data["tracking"].update(parent_run_id=parent_run_id, tags=[f"{k}={v}" for k, v in tags.items()])
    return from_dict(data)


def at_final_step(spec: Spec, pt: Point) -> bool:
    """The point's live checkpoint is its final step (the trainer saves it at the end)."""
    return done.at_final_step(spec.sweep_dir / run_name(spec, pt), pt.steps)


def is_done(spec: Spec, pt: Point) -> bool:
    """At the final step, and its training process exited cleanly afterwards: a process killed
    between its last save and the end of its MLflow run may not have delivered the final
    validation loss, so such a point is launched again (it resumes at the final step, evaluates
    and closes its MLflow run, training nothing)."""
    marker = spec.sweep_dir / run_name(spec, pt) / DONE_FILE
    return marker.is_file() and at_final_step(spec, pt)


def order(spec: Spec) -> list[Point]:
    """Each size's longest run first (its checkpoints seed the others), then its branches."""
    out: list[Point] = []
    for shape in spec.shapes:
        pts = [p for p in spec.points if p.size == shape["name"]]
        out += sorted(pts, key=lambda p: (p.branch_of is not None, -p.steps))
    return out


# --- MLflow parent run ---------------------------------------------------------------------


def parent_run(spec: Spec) -> str:
    """The sweep's MLflow run: created once, its id kept in the sweep directory."""
    path = spec.sweep_dir / PARENT_FILE
    if path.is_file():
        return path.read_text().strip()
    from mlflow.tracking import MlflowClient

    from pretrain.tracking import tracking_uri
    from pretrain.tracking_store import prepare_store

    cfg = point_cfg(spec, spec.points[0], None)
    uri = tracking_uri(cfg)
    prepare_store(cfg)  # the store and experiment, built once, safely (SQLite)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:  # a server store: prepare_store leaves it to the server
        exp_id = client.create_experiment(cfg.tracking.experiment)
    else:
        exp_id = exp.experiment_id
    run = client.create_run(
        exp_id, run_name=spec.name, tags={"sweep": spec.name, "sweep.role": "parent"}
    )
    spec.sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(run.info.run_id)
    os.replace(tmp, path)
    return run.info.run_id


def write_configs(spec: Spec, parent_run_id: str) -> dict[str, Path]:
    out = {}
    folder = spec.sweep_dir / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    for pt in spec.points:
        path = folder / f"{pt.id}.yaml"
        path.write_text(point_cfg(spec, pt, parent_run_id).to_yaml())
        out[pt.id] = path
    return out


# --- local ---------------------------------------------------------------------------------


def train_command(config: Path, nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "pretrain.train", str(config)]
    from launch.torchrun import Topology, torchrun_command

    return torchrun_command(str(config), [], Topology(nproc_per_node=nproc))


def run_local(spec: Spec, say=print) -> int:
    """Train every unfinished point in order; 0 when all are done."""
    parent = parent_run(spec)
    configs = write_configs(spec, parent)
    logs = spec.sweep_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    for pt in order(spec):
        if is_done(spec, pt):
            say(f"{pt.id}: done, skipped")
            continue
        source = f" (cooldown from {pt.branch_of} at step {pt.branch_step})" if pt.branch_of else ""
        say(f"{pt.id}: training {pt.trained_steps} steps{source}; log {logs / pt.id}.log")
        with open(logs / f"{pt.id}.log", "a") as log:
            rc = subprocess.call(
                train_command(configs[pt.id], spec.nproc),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        if rc == 0:
            done.mark_if_final(spec.sweep_dir / run_name(spec, pt), pt.steps)
        if not is_done(spec, pt):
            say(
                f"{pt.id}: stopped (exit {rc}) before its last step; see {logs / pt.id}.log, "
                f"then run again: finished points are skipped"
            )
            return rc or 1
    say(f"all {len(spec.points)} points done; MLflow parent run {parent}")
    return 0


# --- Slurm ---------------------------------------------------------------------------------


def slurm_jobs(spec: Spec, opts: Any) -> list[tuple[list[Point], bool]]:
    """The unfinished points as at most two arrays: runs that can start now, then cooldowns
    whose source run is itself unfinished (submitted with afterok on the first array)."""
    pending = [p for p in order(spec) if not is_done(spec, p)]
    waiting = {p.id for p in pending}
    first = [p for p in pending if p.branch_of is None or p.branch_of not in waiting]
    second = [p for p in pending if p.branch_of is not None and p.branch_of in waiting]
    return [(pts, i == 1) for i, pts in enumerate((first, second)) if pts]


def submit_slurm(spec: Spec, opts: Any, dry_run: bool, say=print) -> int:
    """Write a batch script per array (launch.slurm) and submit them; with dry_run print."""
    import dataclasses

    from launch import slurm

    saved = spec.sweep_dir / PARENT_FILE
    if not dry_run:
        parent = parent_run(spec)
    else:  # the configs it rewrites stay those of the real parent run, where there is one
        parent = saved.read_text().strip() if saved.is_file() else "DRY-RUN"
    configs = write_configs(spec, parent)
    job = None
    for pts, dependent in slurm_jobs(spec, opts):
        runs = [slurm.Run(str(configs[p.id]), [], _load(configs[p.id])) for p in pts]
        o = dataclasses.replace(opts, extra=list(opts.extra))
        o.job_name = o.job_name or f"{spec.name}{'-cooldown' if dependent else ''}"
        if dependent:
            o.extra.append(f"--dependency=afterok:{job or 'JOB_OF_FIRST_ARRAY'}")
        # The marker a second `run --slurm` skips by (pretrain.scaling.done); it also fails a
        # task whose training exited 0 short of its last step, so afterok holds its cooldowns.
        o.on_success = [
            *o.on_success,
            f'{shlex.quote(sys.executable)} -m pretrain.scaling.done "${{train_args[@]}}"',
        ]
        slurm.validate(runs, o)
        text = slurm.render_script(runs, o, Path.cwd())
        if dry_run:
            say(text)
            continue
        path = slurm.script_path(runs)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        for d in slurm.log_dirs(runs):
            d.mkdir(parents=True, exist_ok=True)
        job = slurm.submit(path)
        say(f"submitted job {job} ({len(runs)} runs): {path}")
    if not slurm_jobs(spec, opts):
        say("all points are done")
    return 0


def _load(path: Path) -> Config:
    return from_dict(yaml.safe_load(path.read_text()))
