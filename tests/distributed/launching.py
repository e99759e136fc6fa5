"""Run scripts under torchrun for the distributed tests, and the training worker's launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "distributed" / "worker.py"


def torchrun(
    script: Path,
    args: list[str],
    nproc: int,
    log: Path,
    timeout: int = 600,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run `script args` as `nproc` ranks (gloo, one thread each) with `env` added; the output
    goes to `log`, and a failed launch fails the test with the end of it unless `check` is
    false (a test that expects the failure)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(script),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    text = proc.stdout + proc.stderr
    log.write_text(text)
    assert not check or proc.returncode == 0, f"{log.stem} failed:\n{text[-6000:]}"
    return proc


def launch(
    tmp: Path,
    name: str,
    config: str,
    *overrides: str,
    nproc: int = 2,
    env: dict[str, str] | None = None,
) -> list[dict]:
    """Train `config` with `overrides` as run `name` under tmp/runs; one record per rank. `env`
    reaches the worker (tests/distributed/worker.py reads its fault switches from it)."""
    out = tmp / f"{name}.json"
    args = [str(out), str(ROOT / config), f"run.output_dir={tmp / 'runs'}", f"run.name={name}"]
    torchrun(WORKER, [*args, *overrides], nproc, tmp / f"{name}.log", env=env)
    return json.loads(out.read_text())


def launch_dumping(
    tmp: Path,
    name: str,
    data: str,
    *overrides: str,
    nproc: int = 1,
    worker: str = "reshard_worker.py",
) -> dict:
    """Train the tiny GPT on `data` as run `name` under tmp/runs through `worker` (reshard_worker.py
    or a variant), dumping every parameter right after the step-6 save into tmp/dump_NAME;
    rank 0's record (losses, step, consumed, resharded)."""
    out = tmp / f"{name}.json"
    args = [
        str(out),
        str(tmp / f"dump_{name}"),
        "save:6",
        str(ROOT / "configs" / "tiny.yaml"),
        f"data.path={data}",
        f"run.output_dir={tmp / 'runs'}",
        f"run.name={name}",
        *overrides,
    ]
    torchrun(ROOT / "tests" / "distributed" / worker, args, nproc, tmp / f"{name}.log")
    return json.loads(out.read_text())[0]
