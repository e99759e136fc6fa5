"""A real single-node Slurm for the `slurm` tests: started by scripts/slurm_cluster.sh (which
installs the Debian packages as root when they are missing) and stopped at the end of the session,
also on failure. Where it cannot start (not root, no apt, no packages), the tests skip with the
reason; a cluster that was already running is used and left running."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm_cluster.sh"


def _run(cmd: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), cmd], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    if shutil.which("sbatch") and _run("status", 30).returncode == 0:
        yield "already running"  # the user's: leave it as it was
        return
    if os.geteuid() != 0:
        pytest.skip("no Slurm cluster answers, and starting one (and installing it) needs root")
    proc = _run("start", 900)
    if proc.returncode != 0:
        _run("stop", 120)
        pytest.skip(f"could not start a local Slurm: {proc.stderr.strip()[-500:]}")
    try:
        yield "started"
    finally:
        _run("stop", 120)


@pytest.fixture(autouse=True)
def _needs_slurm(request):
    if request.node.get_closest_marker("slurm"):
        request.getfixturevalue("slurm_cluster")
