"""pretrain-launch --slurm on a real Slurm (scripts/slurm_cluster.sh): a 2-rank job trains and
checkpoints; USR1 makes it save, requeue and finish with the same losses, bitwise, as an
uninterrupted local run; a crashing job is not requeued; a 3-task array gives three runs."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = "configs/tiny.yaml"

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def launch(*args: str) -> str:
    """Submit with the console script; the job id."""
    proc = subprocess.run(
        [str(BIN / "pretrain-launch"), *args, "--slurm"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    m = re.match(r"submitted job (\d+): ", proc.stdout)
    assert m, proc.stdout
    return m.group(1)


def job_records(job: str) -> list[dict[str, str]]:
    """`scontrol show job` as one dict per job (an array has one per task)."""
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job], capture_output=True, text=True, check=True
    ).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.strip().splitlines()]


def wait_done(job: str, timeout: float = 400) -> list[dict[str, str]]:
    """Poll until every record of the job is in a final state (a requeue passes through
    PENDING, so a single look at 'not running' is not enough)."""
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = job_records(job)
        if recs and all(r["JobState"] in final for r in recs):
            return recs
        time.sleep(1)
    pytest.fail(f"job {job} did not finish in {timeout} s: {job_records(job)}")


def losses(db: Path) -> dict[str, dict[int, float]]:
    """The training loss of every logged step, per MLflow run, from the SQLite store."""
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT run_uuid, step, value FROM metrics WHERE key = 'loss'")
        out: dict[str, dict[int, float]] = {}
        for run, step, value in rows:
            out.setdefault(run, {})[step] = value
    return out


def common(data: str, out: Path) -> list[str]:
    return [TINY, f"data.path={data}", f"run.output_dir={out}", "run.eval_interval=0"]


def test_two_rank_job_trains_and_checkpoints(small_dataset, tmp_path):
    job = launch(
        *common(small_dataset, tmp_path),
        "run.train_steps=10",
        "--nproc-per-node=2",
        "--cpus-per-node=2",
    )
    (rec,) = wait_done(job)
    run_dir = tmp_path / "tiny"
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "0", rec
    assert (run_dir / "slurm.sbatch").is_file()
    assert (run_dir / "checkpoints" / "step_00000010" / "COMPLETE").is_file()
    node_log = (run_dir / "logs" / f"job{job}-restart0-node0.log").read_text()
    assert "world 2 = dp 2" in node_log and "trained 10 steps" in node_log


def test_preemption_saves_requeues_and_matches_an_uninterrupted_run(small_dataset, tmp_path):
    args = [*common(small_dataset, tmp_path / "slurm"), "run.train_steps=120", "run.log_interval=1"]
    job = launch(*args, "--nproc-per-node=2", "--cpus-per-node=2")
    run_dir = tmp_path / "slurm" / "tiny"
    train_log = run_dir / "train.log"
    deadline = time.monotonic() + 300
    while not re.search(r"step +20/120", train_log.read_text() if train_log.exists() else ""):
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    (rec,) = wait_done(job)
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "1", rec

    first = (run_dir / "logs" / f"job{job}-restart0-node0.log").read_text()
    second = (run_dir / "logs" / f"job{job}-restart1-node0.log").read_text()
    m = re.search(r"stopped at step (\d+): received SIGUSR1", first)
    assert m, f"the ranks did not stop on USR1:\n{first[-3000:]}"
    stopped = int(m.group(1))
    assert 20 <= stopped < 120
    assert f"resumed from {run_dir / 'checkpoints'}/step_{stopped:08d} at step {stopped}" in second
    assert "trained" in second
    batch = (run_dir / "logs" / f"tiny-{job}.out").read_text()
    t_saved = re.search(r"(\S+) saved after USR1; requeueing", batch).group(1)
    t_start = re.search(r"(\S+) job \d+ start 1 ", batch).group(1)
    requeue_s = time.mktime(time.strptime(t_start, "%Y-%m-%dT%H:%M:%S")) - time.mktime(
        time.strptime(t_saved, "%Y-%m-%dT%H:%M:%S")
    )
    print(f"requeue: stopped at step {stopped}, restarted {requeue_s:.0f} s after the save")

    # The same run on this machine, without Slurm and without interruption.
    local = [
        *common(small_dataset, tmp_path / "local"),
        "run.train_steps=120",
        "run.log_interval=1",
    ]
    proc = subprocess.run(
        [str(BIN / "pretrain-launch"), *local, "--nproc-per-node=2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (slurm_run,) = losses(tmp_path / "slurm" / "mlflow.db").values()  # one MLflow run
    (local_run,) = losses(tmp_path / "local" / "mlflow.db").values()
    assert sorted(slurm_run) == list(range(1, 121))  # every step once: none lost or repeated
    assert slurm_run == local_run  # bitwise: float equality of every step's loss


def test_a_crashing_job_is_not_requeued(small_dataset, tmp_path):
    """A config error only the dataset reveals (the vocabulary is smaller than the tokenizer's):
    launch's checks pass, training exits 2 on the node, and the job fails once."""
    job = launch(
        *common(small_dataset, tmp_path),
        "model.vocab_size=100",
        "--nproc-per-node=2",
        "--cpus-per-node=2",
        "--max-restarts=1",
    )
    (rec,) = wait_done(job)
    assert rec["JobState"] == "FAILED" and rec["Restarts"] == "0", rec
    batch = (tmp_path / "tiny" / "logs" / f"tiny-{job}.out").read_text()
    assert "not requeued" in batch and "requeueing" not in batch
    assert (
        "model.vocab_size=100"
        in (tmp_path / "tiny" / "logs" / f"job{job}-restart0-node0.log").read_text()
    )


def test_array_of_three_configs(small_dataset, tmp_path):
    configs = []
    for i, lr in enumerate([1e-3, 3e-3, 1e-2]):
        data = yaml.safe_load((REPO / TINY).read_text())
        data["run"]["name"] = f"lr{i}"
        data["optim"]["lr"] = lr
        path = tmp_path / f"lr{i}.yaml"
        path.write_text(yaml.safe_dump(data))
        configs.append(str(path))
    job = launch(
        *configs,
        f"data.path={small_dataset}",
        f"run.output_dir={tmp_path / 'runs'}",
        "run.train_steps=10",
        "run.eval_interval=0",
        "--nproc-per-node=1",
        "--cpus-per-node=1",
        "--array-limit=2",
    )
    recs = wait_done(job)
    assert sorted(r["ArrayTaskId"] for r in recs) == ["0", "1", "2"]
    assert all(r["JobState"] == "COMPLETED" for r in recs), recs
    for i, lr in enumerate([1e-3, 3e-3, 1e-2]):
        run_dir = tmp_path / "runs" / f"lr{i}"
        assert (run_dir / "checkpoints" / "step_00000010" / "COMPLETE").is_file()
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == lr
    runs = losses(tmp_path / "runs" / "mlflow.db")
    assert len(runs) == 3  # one MLflow run per task
    assert len({tuple(r.values()) for r in runs.values()}) == 3  # three different trainings


def test_usr1_reaches_every_rank(tmp_path):
    """The generated script, with a probe in place of pretrain.train (a wrapper for python
    swaps the module): after `scancel --signal=USR1 --batch` every rank has the signal, and the
    job requeues once."""
    from launch import slurm

    wrapper = tmp_path / "python"
    swap = '"${@/#pretrain.train/tests.slurm.signal_probe}"'  # bash: replace in every arg
    wrapper.write_text(f"#!/bin/bash\nexec {sys.executable} {swap}\n")
    wrapper.chmod(0o755)
    runs = slurm.load_runs([TINY], [f"run.output_dir={tmp_path}"])
    opts = slurm.SlurmOptions(nproc_per_node=2, cpus_per_node=2)
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.render_script(runs, opts, REPO, python=str(wrapper)))
    for d in slurm.log_dirs(runs):
        d.mkdir(parents=True, exist_ok=True)
    job = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True
    ).stdout.strip()
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-rank{r}").exists() for r in (0, 1)):
        assert time.monotonic() < deadline, f"the probe ranks did not start: {job_records(job)}"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    (rec,) = wait_done(job, timeout=200)
    assert (tmp_path / "usr1-rank0").exists() and (tmp_path / "usr1-rank1").exists()
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "1", rec


def test_scancel_during_start_up_leaves_no_process(small_dataset, tmp_path):
    job = launch(
        *common(small_dataset, tmp_path),
        "run.train_steps=500",
        "--nproc-per-node=2",
        "--cpus-per-node=2",
    )
    logs = tmp_path / "tiny" / "logs"
    deadline = time.monotonic() + 120
    while not (logs / f"job{job}-restart0-node0.log").exists():  # srun has started the step
        assert time.monotonic() < deadline, job_records(job)
        time.sleep(0.1)
    time.sleep(1)  # torchrun and its ranks are importing torch now
    subprocess.run(["scancel", job], check=True)
    (rec,) = wait_done(job)
    assert rec["JobState"] == "CANCELLED", rec
    assert "trained" not in (logs / f"job{job}-restart0-node0.log").read_text()

    def left() -> list[str]:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(tmp_path) in cmd:
                found.append(f"{proc.name}: {cmd}")
        return found

    deadline = time.monotonic() + 30  # slurmstepd's SIGTERM, then SIGKILL after KillWait
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left() == []
