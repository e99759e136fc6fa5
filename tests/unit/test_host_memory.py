"""run.host_memory=reuse: freed blocks stay in the heap, so a training step stops faulting the
same pages in again (pretrain.host_memory)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.host_memory import glibc

ROOT = Path(__file__).resolve().parents[2]

# A forward and backward of a small MLP on CPU: activations and gradients of 0.5-2 MiB, freed
# at the end of every step, as a training step's are. Printed: minor page faults per step.
STEPS = textwrap.dedent(
    """
    import resource, sys, torch
    if sys.argv[1] == "reuse":
        from pretrain.host_memory import reuse_freed_memory
        assert reuse_freed_memory()
    torch.set_num_threads(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)
    )
    x = torch.randn(512, 256)
    def step():
        model(x).square().mean().backward()
        for p in model.parameters():
            p.grad = None
    for _ in range(10):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40)
    """
)


def faults_per_step(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", STEPS, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    return float(out.stdout.strip().splitlines()[-1])


def mean_faults_per_step(mode: str, processes: int = 4) -> float:
    """Over several processes: how often glibc's adaptive thresholds hand a step fresh pages
    varies from process to process (57 to 440 faults per step with its defaults, one process
    in about ten at the low end), so one process alone is not a measurement."""
    return sum(faults_per_step(mode) for _ in range(processes)) / processes


@pytest.mark.skipif(glibc() is None, reason="mallopt is glibc's; this C library has none")
def test_reused_memory_stops_the_page_faults_of_every_step():
    system, reuse = mean_faults_per_step("system"), mean_faults_per_step("reuse")
    # glibc's defaults: each step maps its large blocks afresh (single processes 57-440 faults
    # per step, 0.2-1.8 MiB faulted in) -- the cost the setting removes.
    assert system > 100, system
    # Kept in the heap: the same blocks serve the next step (single processes 0.03-26).
    assert reuse < system / 5, (reuse, system)


def test_host_memory_is_validated(tmp_path):
    assert load_config(None, []).run.host_memory == "reuse"
    assert load_config(None, ["run.host_memory=system"]).run.host_memory == "system"
    with pytest.raises(ConfigError, match="run.host_memory"):
        load_config(None, ["run.host_memory=jemalloc"])
