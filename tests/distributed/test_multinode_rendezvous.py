"""Multi-node rendezvous for real: the generated torchrun commands for node ranks 0 and 1 of a
2-node job, started here as two agents (one rank each), meet in a c10d rendezvous hosted by node
0 and train the tiny GPT together; every step's loss equals a 2-rank standalone run's bitwise."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest

from launch.torchrun import Topology, torchrun_command

REPO = Path(__file__).resolve().parents[2]
TINY = "configs/tiny.yaml"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(db: Path) -> dict[int, float]:
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT step, value FROM metrics WHERE key = 'loss'").fetchall()
    return dict(rows)


def test_two_nodes_train_together(small_dataset, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [f"data.path={small_dataset}", "run.train_steps=10", "run.log_interval=1"]
    common += ["run.eval_interval=0"]
    port, rdzv = _free_port(), f"test-{os.getpid()}"
    overrides = [*common, f"run.output_dir={tmp_path / 'nodes'}"]
    agents = [
        subprocess.Popen(
            torchrun_command(TINY, overrides, Topology(2, 1, rank, "127.0.0.1", port, rdzv)),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    for agent in agents:
        try:
            outputs.append(agent.communicate(timeout=300)[0])
        finally:
            agent.kill()  # no-op once it exited; never leave an agent waiting for its peer
    for rank, (agent, out) in enumerate(zip(agents, outputs, strict=True)):
        assert agent.returncode == 0, f"node {rank}:\n{out[-4000:]}"
    log = (tmp_path / "nodes" / "tiny" / "train.log").read_text()
    assert "layout: world 2 = dp 2" in log and "trained 10 steps" in log

    standalone = Topology(1, 2)
    cmd = torchrun_command(TINY, [*common, f"run.output_dir={tmp_path / 'one'}"], standalone)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two_nodes = _losses(tmp_path / "nodes" / "mlflow.db")
    assert sorted(two_nodes) == list(range(1, 11))
    assert two_nodes == _losses(tmp_path / "one" / "mlflow.db")
