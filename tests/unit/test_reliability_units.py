"""Pieces of pretrain.reliability checked in one process (docs/reliability.md): a discarded
update at every ZeRO stage and precision leaves weights, optimizer state and schedule untouched
(where a plain step moves them), the spike detector's rule, the watchdog's exit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.reliability import SpikeDetector, discarded_update

ROOT = Path(__file__).resolve().parents[2]


def snapshot(engine) -> list[torch.Tensor]:
    """Every number an update could change: this rank's weights (fp32 master partitions under
    ZeRO and bf16, else the module's) and the optimizer state."""
    opt = engine.optimizer
    out = [p.detach().float().clone() for p in engine.module.parameters()]
    for group in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                  "fp32_groups_flat_partition"):  # fmt: skip
        out += [t.detach().clone() for t in getattr(opt, group, []) or [] if t is not None]
    inner = getattr(opt, "optimizer", opt)
    for state in inner.state.values():
        out += [v.detach().clone().reshape(-1) for v in state.values() if torch.is_tensor(v)]
    return out


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def build(world1):
    from megatron.core import parallel_state as ps

    from pretrain.config import load_config
    from pretrain.distributed import Layout, _quiet_cpu_deepspeed

    _quiet_cpu_deepspeed()
    import deepspeed

    had = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"  # what torchrun sets; DeepSpeed's engine asks for it
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    layout = Layout(0, 1, 0, torch.device("cpu"), 0, 1, 0, 1, 0, 1, 1, world1,
                    ps.get_data_parallel_group())  # fmt: skip

    def make(*overrides: str):
        from pretrain.engine import build_engine, build_model_for

        cfg = load_config(
            ROOT / "configs" / "tiny.yaml",
            ["model.vocab_size=128", "model.n_layers=1", "optim.warmup_steps=0", *overrides],
        )
        torch.manual_seed(0)
        return build_engine(cfg, layout, build_model_for(cfg, layout))

    yield make
    if had is None:
        os.environ.pop("LOCAL_RANK", None)
    else:
        os.environ["LOCAL_RANK"] = had


def backward(engine) -> None:
    tokens = torch.randint(0, 128, (2, 33))
    loss = engine(tokens[:, :-1], tokens[:, 1:])
    engine.backward(loss)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel.zero_stage=0"],
        ["parallel.zero_stage=1"],
        ["parallel.zero_stage=2"],
        ["parallel.zero_stage=3"],
        ["parallel.zero_stage=1", "run.precision=bf16"],
        ["parallel.zero_stage=2", "run.precision=bf16"],
    ],
    ids=["z0", "z1", "z2", "z3", "z1-bf16", "z2-bf16"],
)
def test_a_discarded_update_changes_nothing_and_a_plain_one_does(build, overrides):
    engine, scheduler = build(*overrides)
    backward(engine)
    engine.step()  # one real step first, so that optimizer state exists
    before, lr, skipped = snapshot(engine), scheduler.get_last_lr(), engine.skipped_steps
    backward(engine)  # finite gradients: the discard must not rely on an overflow
    with discarded_update(engine):
        engine.step()
    assert not engine.was_step_applied()
    assert same(snapshot(engine), before)
    assert scheduler.get_last_lr() == lr and engine.skipped_steps == skipped + 1
    # The discarded gradients are gone, and the next step trains (the negative control).
    backward(engine)
    engine.step()
    assert engine.was_step_applied() and not same(snapshot(engine), before)
    assert scheduler.get_last_lr() != lr


def test_spike_detector_flags_values_above_mean_plus_k_sigma_once_full():
    d = SpikeDetector(sigma=2.0, window=4)
    for v in (1.0, 3.0, 1.0):
        d.add(v)
    assert not d.is_spike(100.0)  # the window is not full yet
    d.add(3.0)  # mean 2, std 1: the limit is 4
    assert d.threshold() == 4.0
    assert d.is_spike(4.01) and not d.is_spike(4.0)
    d.add(float("nan"))  # non-finite values never enter the statistics
    assert d.threshold() == 4.0


@pytest.mark.slow  # a fresh interpreter importing torch
def test_watchdog_ends_the_process_naming_rank_and_step():
    code = (
        "import time\nfrom pretrain.reliability import Watchdog\n"
        "w = Watchdog(3)\nw.arm(1.0, 41, 'a training step')\nw.start()\ntime.sleep(60)\n"
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 124, proc.stderr
    assert "error: rank 3: watchdog: no training step completed within 1 s (after step 41" in (
        proc.stderr
    )
    assert time.monotonic() - t0 < 30
