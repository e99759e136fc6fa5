"""launch/: torchrun command lines and Slurm batch scripts for 1, 2 and 16 nodes compared with
reviewed golden files (tests/unit/golden/launch/), and every validation error before submission.

The golden files were reviewed as text: one agent per node, c10d on the first node of the
allocation, one rendezvous id per job and start, USR1 forwarded to the ranks, requeue only after
a preemption. Regenerate with UPDATE_GOLDEN=1 and review the diff."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch import slurm
from launch.cli import main as launch_main
from launch.torchrun import Topology, torchrun_command
from pretrain.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden" / "launch"
TINY = "configs/tiny.yaml"
PY = "/venv/bin/python"  # fixed paths keep the golden files independent of this machine
WORKDIR = Path("/work/project")


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from the reviewed golden file"


# --- torchrun ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nnodes, nproc, node_rank", [(1, 2, 0), (2, 4, 0), (2, 4, 1), (16, 8, 0), (16, 8, 15)]
)
def test_torchrun_golden(nnodes, nproc, node_rank):
    topo = Topology(nnodes, nproc, node_rank, "node001", 29400, "job42")
    cmd = torchrun_command(TINY, ["run.train_steps=5"], topo, python=PY)
    check_golden(f"torchrun-{nnodes}x{nproc}-rank{node_rank}.txt", shlex.join(cmd) + "\n")


def test_launch_rendezvous_id_defaults_to_the_run_name(capsys):
    assert launch_main([TINY, "--nnodes", "2", "run.name=exp7", "--dry-run"]) == 0
    cmd = shlex.split(capsys.readouterr().out)
    assert "--rdzv-id=exp7" in cmd and "--rdzv-backend=c10d" in cmd


# --- sbatch scripts ------------------------------------------------------------------------------


def runs_for(*configs: str, overrides=("run.output_dir=/scratch/runs",)):
    return slurm.load_runs(list(configs), list(overrides))


@pytest.mark.parametrize(
    "name, opts",
    [
        ("sbatch-1node-cpu.sh", slurm.SlurmOptions(nodes=1, nproc_per_node=2, cpus_per_node=2)),
        (
            "sbatch-2nodes-gpu.sh",
            slurm.SlurmOptions(
                nodes=2,
                nproc_per_node=8,
                gpus_per_node=8,
                cpus_per_node=64,
                partition="gpu",
                account="llm",
                qos="high",
                time="1-00:00:00",
                constraint="h100",
                exclusive=True,
                mail_user="me@example.org",
                mail_type="END,FAIL",
                extra=["--mem=0"],
                env=["NCCL_DEBUG=INFO", "NCCL_IB_HCA=mlx5"],
                setup=["module load cuda/12.4"],
                srun_args="--container-image=nvcr.io#nvidia/pytorch:24.05-py3",
                signal_lead=300,
            ),
        ),
        (
            "sbatch-16nodes-gpu.sh",
            slurm.SlurmOptions(nodes=16, nproc_per_node=8, gpus_per_node=8, time="48:00:00"),
        ),
    ],
)
def test_sbatch_golden(name, opts):
    runs = runs_for(TINY)
    slurm.validate(runs, opts)
    check_golden(name, slurm.render_script(runs, opts, WORKDIR, python=PY))


def test_sbatch_array_golden(tmp_path):
    configs = []
    for i, lr in enumerate(["1.0e-3", "3.0e-3", "1.0e-2"]):
        path = tmp_path / f"lr{i}.yaml"
        data = yaml.safe_load((REPO / TINY).read_text())
        data["run"]["name"] = f"lr{i}"
        data["optim"]["lr"] = float(lr)
        path.write_text(yaml.safe_dump(data))
        configs.append(str(path))
    runs = runs_for(*configs)
    opts = slurm.SlurmOptions(nodes=1, nproc_per_node=2, array_limit=2, time="30")
    slurm.validate(runs, opts)
    text = slurm.render_script(runs, opts, WORKDIR, python=PY).replace(str(tmp_path), "/cfgs")
    check_golden("sbatch-array3.sh", text)


def test_sbatch_dry_run_prints_the_script_and_writes_nothing(capsys, tmp_path):
    rc = launch_main(
        [TINY, "--slurm", "--dry-run", "--nproc-per-node", "2", f"run.output_dir={tmp_path}"]
    )
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    assert out.startswith("#!/bin/bash\n") and "#SBATCH --requeue" in out
    assert list(tmp_path.iterdir()) == []
    proc = subprocess.run(["bash", "-n"], input=out, text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr  # the generated script parses


# --- validation: one clear error each, before anything is written ----------------------------


def error_of(capsys, *args: str) -> str:
    rc = launch_main([*args, "--slurm"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "args, start, fix",
    [
        (
            ["--nproc-per-node", "2", "parallel.tp=4"],
            "error: config parallel.tp=4: ",
            "world size 2",
        ),
        (
            ["--nodes", "3", "--nproc-per-node", "2", "parallel.global_batch_size=8"],
            "error: config parallel.global_batch_size=8: ",
            "micro_batch_size*dp=24",
        ),
        (
            ["--gpus-per-node", "8", "--nproc-per-node", "4"],
            "error: config --nproc-per-node=4: ",
            "--nproc-per-node 8",
        ),
        (
            ["--gpus-per-node", "4", "--nodes", "2", "parallel.tp=8", "model.n_heads=8"],
            "error: config parallel.tp=8: ",
            "inside a node",
        ),
        (["--time", "1h"], "error: config --time='1h': ", "HOURS:MINUTES:SECONDS"),
        (["--time", "2:00:00:00"], "error: config --time='2:00:00:00': ", "DAYS-HOURS"),
        (["--time", "2", "--signal-lead", "120"], "error: config --signal-lead=120: ", "120 s"),
        (["--env", "NCCL DEBUG=1"], "error: config --env='NCCL DEBUG=1': ", "KEY=VALUE"),
        (["--nodes", "0"], "error: config --nodes/--nproc-per-node=(0, 1): ", "positive"),
    ],
)
def test_slurm_validation_errors(capsys, tmp_path, args, start, fix):
    line = error_of(capsys, TINY, f"run.output_dir={tmp_path}", *args)
    assert line.startswith(start), line
    assert fix in line
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_slurm_refuses_a_run_directory_of_another_config(capsys, tmp_path):
    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    cfg = slurm.load_runs([TINY], [f"run.output_dir={tmp_path}"])[0].cfg
    data = cfg.to_dict()
    data["model"]["vocab_size"] = 512  # what a first start fills in: not a difference
    (run_dir / "config.yaml").write_text(yaml.safe_dump(data))
    # The same run again, longer: fine (the run continues).
    rc = launch_main(
        [TINY, f"run.output_dir={tmp_path}", "run.train_steps=99", "--slurm", "--dry-run"]
    )
    assert rc == 0
    capsys.readouterr()
    line = error_of(capsys, TINY, f"run.output_dir={tmp_path}", "model.d_model=128", "--dry-run")
    assert line.startswith("error: config run.name='tiny': ")
    assert str(run_dir) in line and "model.d_model" in line and "another run.name" in line


def test_slurm_array_needs_a_run_directory_each(capsys, tmp_path):
    line = error_of(capsys, TINY, TINY, f"run.output_dir={tmp_path}", "--dry-run")
    assert line.startswith("error: config run.name='tiny': ") and "own run.name" in line


def test_time_forms():
    assert [
        slurm.time_seconds(t) for t in ["30", "30:15", "2:00:00", "1-12", "1-0:30", "1-0:0:5"]
    ] == [1800, 1815, 7200, 129600, 88200, 86405]
    with pytest.raises(ConfigError):
        slurm.time_seconds("")


def test_launch_imports_no_torch():
    code = "import sys, launch.cli, launch.slurm, launch.torchrun; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.strip() == "False", proc.stderr
