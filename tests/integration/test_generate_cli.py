"""pretrain-generate on checkpoints of real tiny runs (single process, through
`python -m pretrain.train`): with the run's seed, temperature 0.8 and top-k 40 it must print
exactly the sample the finished run printed, for a ZeRO-0 and a ZeRO-3 checkpoint. The negative
control: the same command on the run's earlier checkpoint prints something else.

(TP=2 checkpoints, merged into one model by the CLI: tests/distributed/test_generate_tp.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SEED = 1234  # configs/tiny.yaml's run.seed (the default)
PROMPT = "def"
SAMPLE = ["--max-new-tokens", "12", "--temperature", "0.8", "--top-k", "40", "--seed", str(SEED)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def train(tmp: Path, data: str, name: str, *overrides: str) -> str:
    """Train configs/tiny.yaml for 6 steps (checkpoints at 3 and 6); returns its sample."""
    cmd = [
        sys.executable,
        "-m",
        "pretrain.train",
        str(ROOT / "configs/tiny.yaml"),
        f"data.path={data}",
        f"run.output_dir={tmp}",
        f"run.name={name}",
        "run.train_steps=6",
        "run.eval_interval=0",
        "run.eval_batches=0",
        "run.sample_tokens=12",
        f"run.sample_prompt={PROMPT}",
        "optim.warmup_steps=2",
        "checkpoint.interval=3",
        "tracking.enabled=false",
        *overrides,
    ]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The sample ends where the run's closing "wall time ..." line begins.
    return proc.stdout.split("sample:\n", 1)[1].split("\nwall time ", 1)[0].rstrip("\n")


def generate(path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pretrain.generate_cli", str(path), "--prompt", PROMPT, *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_dataset):
    tmp = tmp_path_factory.mktemp("gen")
    return {
        "tmp": tmp,
        "zero0": train(tmp, small_dataset, "zero0"),
        "zero3": train(tmp, small_dataset, "zero3", "parallel.zero_stage=3"),
    }


@pytest.mark.parametrize("run", ["zero0", "zero3"])
def test_cli_reproduces_the_runs_sample(runs, run):
    proc = generate(runs["tmp"] / run, *SAMPLE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.rstrip("\n") == runs[run]
    # Negative control: the run's step-3 checkpoint holds other weights.
    earlier = generate(runs["tmp"] / run / "checkpoints" / "step_00000003", *SAMPLE)
    assert earlier.returncode == 0, earlier.stderr[-3000:]
    assert earlier.stdout.rstrip("\n") != runs[run]


def test_cli_greedy_is_deterministic_and_prompt_prefixed(runs):
    a = generate(runs["tmp"] / "zero0", "--max-new-tokens", "8")
    b = generate(runs["tmp"] / "zero0" / "checkpoints", "--max-new-tokens", "8")
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-3000:] + b.stderr[-3000:]
    assert a.stdout == b.stdout and a.stdout.startswith(PROMPT)


def test_cli_rejects_a_missing_checkpoint(tmp_path):
    proc = generate(tmp_path / "nothing")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "nothing" in proc.stderr
    empty = tmp_path / "run"
    (empty / "checkpoints").mkdir(parents=True)
    proc = generate(empty)
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr
