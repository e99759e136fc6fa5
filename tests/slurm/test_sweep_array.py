"""`pretrain-sweep run SPEC --slurm` on a real Slurm (scripts/slurm_cluster.sh): a 2-size x
3-budget warmup-stable-decay sweep becomes two job arrays, the long runs and then, held by
afterok, their cooldowns branched from the long runs' checkpoints; every point ends with its final
checkpoint and done marker as an MLflow child of the sweep's parent run, a second `run --slurm`
submits nothing, and `pretrain-sweep fit` reads the runs back."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_slurm_jobs import job_records, wait_done

REPO = Path(__file__).resolve().parents[2]
SWEEP = str(Path(sys.executable).parent / "pretrain-sweep")

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def write_spec(tmp_path: Path, dataset: str) -> Path:
    spec = {
        "name": "arr",
        "base": str(REPO / "configs" / "tiny.yaml"),
        "overrides": [
            f"data.path={dataset}",
            "optim.warmup_steps=2",
            "run.log_interval=1",
            "run.eval_interval=0",  # validation at the end of each run only
        ],
        "output_dir": str(tmp_path / "sweeps"),
        "ladder": {
            "shapes": [
                {"name": "s", "n_layers": 1, "d_model": 32, "n_heads": 2},
                {"name": "m", "n_layers": 2, "d_model": 48, "n_heads": 2},
            ]
        },
        # 20, 40 and 80 steps of 4 x 32 tokens: cooldowns from steps 16 and 32 of the 80-step run
        "budgets": {"tokens": [2560, 5120, 10240]},
        "schedule": "wsd",
        "cooldown_fraction": 0.2,
    }
    path = tmp_path / "arr.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [SWEEP, *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def stamp(text: str) -> float:
    return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


def test_sweep_job_arrays_run_cooldowns_after_their_long_runs_and_fit(small_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    from pretrain.scaling.runner import PARENT_FILE, order, point_cfg, run_name
    from pretrain.scaling.spec import load_spec
    from pretrain.tracking import tracking_uri

    path = write_spec(tmp_path, small_dataset)
    meta = json.loads((Path(small_dataset) / "dataset.json").read_text())
    spec = load_spec(path, vocab_size=meta["tokenizer"]["vocab_size"])
    longs = [p for p in order(spec) if p.branch_of is None]
    cools = [p for p in order(spec) if p.branch_of is not None]
    assert len(longs) == 2 and len(cools) == 4

    out = sweep("run", str(path), "--slurm", "--array-limit", "2").stdout
    jobs = re.findall(r"submitted job (\d+) \((\d+) runs\): (\S+)", out)
    assert [n for _, n, _ in jobs] == ["2", "4"], out
    (first, _, _), (second, _, cool_script) = jobs
    assert f"#SBATCH --dependency=afterok:{first}" in Path(cool_script).read_text()
    # Held by Slurm, not by timing: while the long runs train, the cooldowns wait on them.
    held = job_records(second)
    assert held and all(r["JobState"] == "PENDING" and r["Reason"] == "Dependency" for r in held), (
        held
    )

    long_recs = wait_done(first, timeout=900)  # read now: Slurm forgets ended jobs (MinJobAge)
    assert all(r["JobState"] == "COMPLETED" for r in long_recs), long_recs
    cool_recs = wait_done(second, timeout=900)
    assert all(r["JobState"] == "COMPLETED" for r in cool_recs), cool_recs
    assert len(long_recs) == 2 and len(cool_recs) == 4
    last_long_end = max(stamp(r["EndTime"]) for r in long_recs)
    assert all(stamp(r["StartTime"]) >= last_long_end for r in cool_recs), (long_recs, cool_recs)

    for pt in spec.points:
        run_dir = spec.sweep_dir / run_name(spec, pt)
        final = run_dir / "checkpoints" / f"step_{pt.steps:08d}"
        assert (final / "COMPLETE").is_file(), pt.id
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == final.name
        assert (run_dir / "sweep-point-done").is_file(), pt.id

    parent = (spec.sweep_dir / PARENT_FILE).read_text().strip()
    client = MlflowClient(tracking_uri(point_cfg(spec, spec.points[0], parent)))
    exp = client.get_run(parent).info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    by_point = {r.data.tags["sweep.point"]: r for r in children}
    assert sorted(by_point) == sorted(p.id for p in spec.points) and len(children) == 6
    assert all(r.info.status == "FINISHED" for r in children)

    def step_losses(run) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}

    for pt in cools:  # each cooldown started from its long run's checkpoint, not from scratch
        tags = by_point[pt.id].data.tags
        src_ckpt = spec.sweep_dir / run_name(spec, spec.point(pt.branch_of)) / "checkpoints"
        assert tags["pretrain.branched_from_checkpoint"] == str(
            (src_ckpt / f"step_{pt.branch_step:08d}").resolve()
        )
        assert tags["pretrain.branched_from_run"] == by_point[pt.branch_of].info.run_id
        mine, source = step_losses(by_point[pt.id]), step_losses(by_point[pt.branch_of])
        assert sorted(mine) == list(range(pt.branch_step + 1, pt.steps + 1))
        # The first step after the branch sees the checkpoint's weights and data position.
        assert mine[pt.branch_step + 1] == source[pt.branch_step + 1]

    # Negative control: a second submission finds every point done and submits nothing; with
    # one point's marker removed it would submit that point alone.
    again = sweep("run", str(path), "--slurm", "--array-limit", "2").stdout
    assert "submitted job" not in again and "all points are done" in again
    marker = spec.sweep_dir / run_name(spec, cools[0]) / "sweep-point-done"
    marker.unlink()
    dry = sweep("run", str(path), "--slurm", "--dry-run").stdout
    assert dry.count("#!/bin/bash") == 1 and f"configs/{cools[0].id}.yaml" in dry
    assert "--array" not in dry  # one run: a plain job
    marker.write_text("")

    fitted = sweep("fit", str(path), "--bootstrap", "0").stdout
    print(fitted)
    result = json.loads((spec.sweep_dir / "fit" / "fit.json").read_text())
    assert result["runs"] == 6 and result["parent_run_id"] == parent
    for png in ("loss_vs_compute.png", "isoflop_profiles.png", "fit_vs_observed.png"):
        assert (spec.sweep_dir / "fit" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
