"""Layouts that cannot run are refused by `pretrain.train.prepare` (the entry point's first
step) with a ConfigError naming the option, before any process group exists and within a
second: a wrong launch costs no start-up of DeepSpeed, megatron-core or torchrun's workers.

The refusals: ZeRO-2/3 with pipeline parallelism (DeepSpeed's pipeline engine supports ZeRO-1 at
most), more pipeline stages than transformer blocks, a uniform partition the blocks do not
divide, and a world size that tp * pp does not divide (read from WORLD_SIZE, as torchrun sets
it). Each case has a twin one step away that is accepted, so the refusal is aimed at exactly that
condition and not at the config as a whole.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.config import ConfigError
from pretrain.train import prepare

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny.yaml")  # GPT, 2 layers
SECOND = 1.0

# (id, world size, overrides refused, option named, the accepted twin's overrides)
REFUSED = [
    ("zero2-with-pp", 2, ["parallel.pp=2", "parallel.zero_stage=2"], "parallel.zero_stage",
     ["parallel.pp=2", "parallel.zero_stage=1"]),
    ("zero3-with-pp", 2, ["parallel.pp=2", "parallel.zero_stage=3"], "parallel.zero_stage",
     ["parallel.pp=1", "parallel.zero_stage=3"]),
    ("pp-more-than-blocks", 4, ["parallel.pp=4", "model.n_layers=2"], "parallel.pp",
     ["parallel.pp=4", "model.n_layers=4"]),
    # T5 counts encoder and decoder blocks together: 2 + 1 blocks hold 3 stages, not 4.
    ("t5-pp-more-than-blocks", 4,
     ["model.family=t5", "model.positions=relative", "model.n_layers=2",
      "model.n_decoder_layers=1", "parallel.pp=4"], "parallel.pp",
     ["model.family=t5", "model.positions=relative", "model.n_layers=2",
      "model.n_decoder_layers=2", "parallel.pp=4"]),
    ("uniform-partition-indivisible", 2,
     ["parallel.pp=2", "model.n_layers=3", "parallel.pipeline_partition=uniform"], "parallel.pp",
     ["parallel.pp=2", "model.n_layers=3", "parallel.pipeline_partition=parameters"]),
    ("world-not-divisible-by-tp-pp", 6, ["parallel.tp=2", "parallel.pp=2"],
     "parallel.tp*parallel.pp", ["parallel.tp=2", "parallel.pp=1"]),
    ("world-not-divisible-by-tp", 3, ["parallel.tp=2"], "parallel.tp", ["parallel.tp=1"]),
]  # fmt: skip


@pytest.fixture(scope="module")
def warm(small_dataset):
    """Import what prepare imports and read the dataset once, so the timing below measures the
    checks, not the first import of torch."""
    import megatron.core.parallel_state  # noqa: F401

    import data_pipeline.loader  # noqa: F401
    import pretrain.checkpoint  # noqa: F401

    return small_dataset


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_layout_is_refused_before_any_process_group(
    case, warm, monkeypatch, tmp_path, group_starts
):
    _, world, overrides, option, accepted = case
    monkeypatch.setenv("WORLD_SIZE", str(world))
    common = [f"data.path={warm}", f"run.output_dir={tmp_path}", "tracking.enabled=false"]
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        prepare([CONFIG, *common, *overrides])
    seconds = time.perf_counter() - t0
    assert str(info.value).startswith(f"config {option}="), str(info.value)
    assert seconds < SECOND, f"refused after {seconds:.2f} s"
    # The twin passes every check of prepare: the refusal is aimed at its one condition.
    prepare([CONFIG, *common, *accepted])
    assert group_starts == []


def test_entry_point_exits_2_at_once_on_a_refused_layout(tmp_path):
    """`pretrain-train` itself: a refused layout prints the error and exits with status 2
    quickly, in a fresh process (the config is checked before torch is imported)."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    cmd = [sys.executable, "-m", "pretrain.train", CONFIG, "parallel.pp=2", "parallel.zero_stage=3"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: config parallel.zero_stage=3" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert seconds < 5 * SECOND, f"exited after {seconds:.2f} s"
