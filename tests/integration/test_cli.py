"""The console scripts' front doors: pretrain-launch builds the torchrun command after checking
the config against the world size; pretrain-train rejects a bad config, a missing dataset and a
missing checkpoint with exit code 2 and one line on stderr, before creating anything."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import cli as launch_cli
from launch.cli import main as launch_main

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: the console scripts live beside python
TINY = "configs/tiny.yaml"
TIMEOUT = 120


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the configs are given relative to the repository, as users do


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if the launcher tries to start processes."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the launcher started a process: {args}")

    monkeypatch.setattr(launch_cli.supervise, "run", refuse)


def dry_run(capsys, *args: str) -> list[str]:
    rc = launch_main([*args, "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err == ""
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return shlex.split(lines[0])


def _after(cmd: list[str], *seq: str) -> bool:
    """Whether `seq` occurs in `cmd` as consecutive items."""
    n = len(seq)
    return any(cmd[i : i + n] == list(seq) for i in range(len(cmd) - n + 1))


# --- pretrain-launch ----------------------------------------------------------------------------


def test_launch_dry_run_single_node(capsys, no_launch):
    cmd = dry_run(capsys, TINY, "--nproc-per-node", "2", "run.train_steps=5")
    assert cmd[0] == sys.executable
    assert _after(cmd, "-m", "launch.agent")  # torchrun, a stop signal to it exits 0
    assert "--nproc-per-node=2" in cmd
    assert "--standalone" in cmd
    assert not any(a.startswith(("--nnodes", "--node-rank", "--master-addr")) for a in cmd)
    # torchrun's options, then the module, the config and the overrides, in that order
    assert cmd[-4:] == ["-m", "pretrain.train", TINY, "run.train_steps=5"]


def test_launch_dry_run_overrides_keep_their_order(capsys, no_launch):
    overrides = ["run.train_steps=5", "model.n_layers=1", "run.name=b c"]
    cmd = dry_run(capsys, TINY, overrides[0], "--nproc-per-node", "2", *overrides[1:])
    assert cmd[-len(overrides) :] == overrides  # a space survives shlex quoting


def test_launch_dry_run_multi_node(capsys, no_launch):
    cmd = dry_run(
        capsys,
        TINY,
        "--nproc-per-node",
        "2",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "10.0.0.1",
        "--master-port",
        "4242",
    )
    for arg in (
        "--nproc-per-node=2",
        "--nnodes=2",
        "--node-rank=1",
        "--rdzv-backend=c10d",  # the store on the first node, at the given address and port
        "--rdzv-endpoint=10.0.0.1:4242",
        "--rdzv-conf=is_host=0",
    ):
        assert arg in cmd
    assert "--standalone" not in cmd
    assert cmd[-3:] == ["-m", "pretrain.train", TINY]


def test_launch_checks_the_world_size_of_all_nodes(capsys, no_launch):
    """tp=4 needs 4 processes: 2 nodes x 2 fit, where 1 node x 2 does not."""
    cmd = dry_run(capsys, TINY, "--nproc-per-node", "2", "--nnodes", "2", "parallel.tp=4")
    assert "--nnodes=2" in cmd and cmd[-1] == "parallel.tp=4"
    assert launch_main([TINY, "--nproc-per-node", "2", "parallel.tp=4", "--dry-run"]) == 2
    assert "world size 2" in capsys.readouterr().err


def test_launch_runs_what_dry_run_prints(capsys, monkeypatch, dataset, tmp_path):
    """Without --dry-run the same argv goes to the supervisor, with one thread per rank."""
    args = [
        TINY,
        "--nproc-per-node",
        "2",
        "run.train_steps=5",
        f"data.path={dataset}",
        f"run.output_dir={tmp_path}",  # the launcher prepares the MLflow store there
    ]
    printed = dry_run(capsys, *args)
    calls = []
    monkeypatch.setattr(launch_cli.supervise, "run", lambda cmd, env: calls.append((cmd, env)) or 7)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert launch_main(args) == 7  # torchrun's exit status is passed on
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launch_main(args) == 7
    (cmd1, env1), (cmd2, env2) = calls
    assert cmd1 == printed and cmd2 == printed
    assert env1["OMP_NUM_THREADS"] == "1"
    assert env2["OMP_NUM_THREADS"] == "3"  # the user's choice wins


def test_launch_without_data_stops_before_starting_ranks(capsys, no_launch, tmp_path):
    missing = tmp_path / "no_such_dataset"
    rc = launch_main([TINY, "--nproc-per-node", "2", f"data.path={missing}"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith(f"error: config data.path='{missing}'") and "pretrain-data build" in err
    # A dry run prints the command anyway: it may be meant for a machine that has the data.
    assert launch_main([TINY, "--nproc-per-node", "2", f"data.path={missing}", "--dry-run"]) == 0


@pytest.mark.parametrize("dry", [True, False])
def test_launch_layout_mismatch_caught_before_launch(capsys, no_launch, dry):
    rc = launch_main([TINY, "--nproc-per-node", "2", "parallel.tp=4", *(["--dry-run"] * dry)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert err.startswith("error: config parallel.tp=4: ")
    assert "world size 2" in err


@pytest.mark.parametrize(
    "args, field",
    [
        ([TINY, "model.n_heads=5"], "model.n_heads"),
        ([TINY, "model.n_layer=2"], "model.n_layer"),
        (["configs/missing.yaml"], "config file"),
        ([TINY, "--nproc-per-node", "0"], "--nproc-per-node/--nnodes"),
        ([TINY, "--nnodes", "0"], "--nproc-per-node/--nnodes"),
        (
            [TINY, "--nproc-per-node", "3", "parallel.global_batch_size=10"],
            "parallel.global_batch_size",
        ),
    ],
)
def test_launch_config_errors(capsys, no_launch, args, field):
    assert launch_main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"error: config {field}=")
    assert len(err.strip().splitlines()) == 1


def test_launch_console_script(tmp_path):
    """The installed entry point, in a real process."""
    proc = subprocess.run(
        [
            str(BIN / "pretrain-launch"),
            TINY,
            "--nproc-per-node",
            "2",
            "--dry-run",
            "run.train_steps=5",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout.strip())
    assert "--nproc-per-node=2" in cmd and "--standalone" in cmd
    assert cmd[-4:] == ["-m", "pretrain.train", TINY, "run.train_steps=5"]
    proc = subprocess.run(
        [str(BIN / "pretrain-launch"), TINY, "--nproc-per-node", "2", "parallel.tp=4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: config parallel.tp=4: ")
    assert "Traceback" not in proc.stderr


# --- pretrain-train: errors before anything starts -----------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A tiny real dataset: five small stdlib modules, a 512-token BPE (the smallest vocabulary
    that holds 256 bytes and 103 special tokens is 359)."""
    from data_pipeline.build import build
    from data_pipeline.sources import stdlib_sources

    files = [p for p in stdlib_sources() if p.stat().st_size > 2000][:5]
    out = tmp_path_factory.mktemp("data") / "tiny"
    build([str(p) for p in files], out, vocab_size=512, progress=False)
    return out


def train(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return subprocess.run(
        [str(BIN / "pretrain-train"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**environ, **(env or {})},
    )


def assert_one_error_line(proc: subprocess.CompletedProcess, prefix: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "override, prefix",
    [
        ("model.n_heads=5", "error: config model.n_heads=5: "),
        ("model.n_layer=2", "error: config model.n_layer=2: unknown key"),
    ],
)
def test_train_rejects_bad_config(tmp_path, dataset, override, prefix):
    runs = tmp_path / "runs"
    proc = train(TINY, f"data.path={dataset}", f"run.output_dir={runs}", override)
    assert_one_error_line(proc, prefix)
    assert not runs.exists()


def test_train_missing_dataset(tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "nope"
    proc = train(TINY, f"data.path={data}", f"run.output_dir={runs}")
    line = assert_one_error_line(proc, "error: ")
    assert "pretrain-data build" in line
    assert str(data) in line
    assert not runs.exists() and not data.exists()


def test_train_missing_checkpoint(tmp_path, dataset):
    runs, ckpt = tmp_path / "runs", tmp_path / "missing_ckpt"
    proc = train(TINY, f"data.path={dataset}", f"run.output_dir={runs}", f"run.resume={ckpt}")
    line = assert_one_error_line(proc, "error: ")
    assert str(ckpt) in line
    assert not runs.exists() and not ckpt.exists()


def test_train_layout_mismatch_under_torchrun(tmp_path, dataset):
    """WORLD_SIZE from torchrun is checked against the layout before any process group."""
    runs = tmp_path / "runs"
    proc = train(
        TINY,
        f"data.path={dataset}",
        f"run.output_dir={runs}",
        "parallel.tp=2",
        env={"WORLD_SIZE": "3", "RANK": "0"},
    )
    assert_one_error_line(proc, "error: config parallel.tp=2: ")
    assert not runs.exists()


def test_train_error_printed_by_rank_0_only(tmp_path):
    proc = train(
        TINY,
        "model.n_heads=5",
        f"run.output_dir={tmp_path / 'runs'}",
        env={"RANK": "1", "WORLD_SIZE": "2"},
    )
    assert proc.returncode == 2
    assert proc.stderr == "" and proc.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_blended_run_reports_the_realised_mixture(dataset, tmp_path):
    """A blend of two datasets trains, and the end of the run states the realised share of each
    next to its weight (the schedule's exactness is proven in tests/unit/test_blend.py)."""
    other = tmp_path / "copy of dataset"  # a second path, same tokenizer; a space in the name
    shutil.copytree(dataset, other)
    blend = f'data.blend=["3 {dataset}", "1 {other}"]'
    proc = train(
        TINY,
        blend,
        "run.train_steps=25",
        "run.eval_batches=0",
        "tracking.enabled=false",
        f"run.output_dir={tmp_path / 'runs'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("data mixture:")]
    assert len(lines) == 2 and str(other) in lines[1]
    shares = [float(re.search(r": ([\d.]+)% of 100 sequences", line).group(1)) for line in lines]
    assert shares == pytest.approx([75.0, 25.0], abs=2.0)
