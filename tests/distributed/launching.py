"""Launch the training worker under torchrun and read back its JSON record (shared by the
distributed training tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "distributed" / "worker.py"


def launch(tmp: Path, name: str, config: str, *overrides: str, nproc: int = 2) -> list[dict]:
    """Train `config` with `overrides` as run `name` under tmp/runs; one record per rank."""
    out = tmp / f"{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(WORKER),
        str(out),
        str(ROOT / config),
        f"run.output_dir={tmp / 'runs'}",
        f"run.name={name}",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    (tmp / f"{name}.log").write_text(log)
    assert proc.returncode == 0, f"{name} failed:\n{log[-4000:]}"
    return json.loads(out.read_text())
