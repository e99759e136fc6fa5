"""The validation table of issue 15 (docs/reliability.md): every impossible or inconsistent
setting is refused by `pretrain.train.prepare` (the entry point's first step) with one error
naming the value and a fix, before any process group exists and within a second. Each row has
a twin one step away that is accepted, so the refusal is aimed at exactly that condition.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from data_pipeline.errors import DataError
from pretrain.config import ConfigError
from pretrain.train import prepare

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny.yaml")  # GPT, 2 layers, 4 heads, d_model 64
SECOND = 1.0

# (id, world size, overrides refused, error type, text the message holds, accepted twin)
TABLE = [
    ("world-not-divisible-by-tp-x-pp", 6, ["parallel.tp=2", "parallel.pp=2"], ConfigError,
     "config parallel.tp*parallel.pp=4: the world size 6", ["parallel.tp=2"]),
    # tp=3 on 2 processes: blamed on tp, with sizes that fit the world AND the heads.
    ("tp3-on-2-processes", 2, ["parallel.tp=3"], ConfigError,
     "use parallel.tp in [1, 2]", ["parallel.tp=2"]),
    ("heads-not-divisible-by-tp", 2, ["model.n_heads=2", "model.d_model=64", "parallel.tp=2",
     "model.n_kv_heads=1"], ConfigError, "config model.n_kv_heads=1: must divide by "
     "parallel.tp=2", ["model.n_heads=2", "parallel.tp=2"]),
    ("heads-not-divisible-by-tp-world-aware", 3, ["parallel.tp=3"], ConfigError,
     # [1, 2, 4] divide the heads; only 1 also fits 3 processes.
     "config model.n_heads=4: must divide by parallel.tp=3; parallel.tp in [1]",
     ["parallel.tp=1"]),
    ("experts-not-divisible-by-ep", 4, ["model.moe_experts=3", "parallel.ep=2"], ConfigError,
     "config parallel.ep=2: model.moe_experts=3 must divide by ep", ["model.moe_experts=4",
     "parallel.ep=2"]),
    ("layers-not-divisible-by-pp", 2, ["parallel.pp=2", "model.n_layers=3"], ConfigError,
     "config parallel.pp=2: parallel.pipeline_partition=uniform needs", ["parallel.pp=2"]),
    ("global-batch-not-divisible", 2, ["parallel.global_batch_size=12"], ConfigError,
     "config parallel.global_batch_size=12: must be a multiple of micro_batch_size*dp=8",
     ["parallel.global_batch_size=16"]),
    ("vocab-smaller-than-tokenizer", 1, ["model.vocab_size=64"], ConfigError,
     "config model.vocab_size=64: the dataset's tokenizer has", ["model.vocab_size=512"]),
    ("zero2-with-pp", 2, ["parallel.pp=2", "parallel.zero_stage=2"], ConfigError,
     "config parallel.zero_stage=2: ZeRO-2 and ZeRO-3 do not work with pipeline",
     ["parallel.pp=2", "parallel.zero_stage=1"]),
    ("zero3-with-pp", 2, ["parallel.pp=2", "parallel.zero_stage=3"], ConfigError,
     "config parallel.zero_stage=3: ZeRO-2 and ZeRO-3", ["parallel.zero_stage=3"]),
    ("unknown-key", 1, ["model.n_layer=2"], ConfigError,
     "config model.n_layer=2: unknown key", ["model.n_layers=2"]),
    ("wrong-type", 1, ["run.train_steps=ten"], ConfigError,
     "config run.train_steps='ten': use an integer", ["run.train_steps=10"]),
    ("zero-size", 1, ["parallel.micro_batch_size=0"], ConfigError,
     "config parallel.micro_batch_size=0: use >= 1", ["parallel.micro_batch_size=1"]),
    ("negative-size", 1, ["model.d_model=-64"], ConfigError,
     "config model.d_model=-64: use an integer >= 1", ["model.d_model=64"]),
    ("missing-data-path", 1, ["data.path=/nonexistent/data"], DataError,
     "no dataset at /nonexistent/data", []),
    ("bad-reliability-value", 1, ["reliability.max_consecutive_skips=0"], ConfigError,
     "config reliability.max_consecutive_skips=0: use an integer >= 1",
     ["reliability.max_consecutive_skips=1"]),
    ("bad-inject-entry", 1, ["reliability.inject=[nan@x]"], ConfigError,
     "config reliability.inject[0]='nan@x': use 'KIND@STEP'", ["reliability.inject=[nan@3]"]),
]  # fmt: skip


@pytest.fixture(scope="module")
def warm(small_dataset):
    """Import what prepare imports and read the dataset once, so the timing below measures the
    checks, not the first import of torch."""
    import data_pipeline.loader  # noqa: F401
    import pretrain.checkpoint  # noqa: F401

    return small_dataset


def refused(overrides, common, error):
    t0 = time.perf_counter()
    with pytest.raises(error) as info:
        prepare([CONFIG, *common, *overrides])
    return str(info.value), time.perf_counter() - t0


@pytest.mark.parametrize("case", TABLE, ids=[c[0] for c in TABLE])
def test_each_case_is_refused_at_once_naming_value_and_fix(
    case, warm, monkeypatch, tmp_path, group_starts
):
    _, world, overrides, error, text, accepted = case
    monkeypatch.setenv("WORLD_SIZE", str(world))
    common = [f"data.path={warm}", f"run.output_dir={tmp_path}", "tracking.enabled=false"]
    message, seconds = refused(overrides, common, error)
    assert text in message, message
    assert seconds < SECOND, f"refused after {seconds:.2f} s"
    prepare([CONFIG, *common, *accepted])
    assert group_starts == []


def test_a_run_directory_holding_another_runs_config_is_refused(
    warm, monkeypatch, tmp_path, group_starts
):
    monkeypatch.setenv("WORLD_SIZE", "1")
    common = [f"data.path={warm}", f"run.output_dir={tmp_path}", "run.name=a"]
    cfg, _, _ = prepare([CONFIG, *common])
    cfg.run.run_dir.mkdir(parents=True)
    (cfg.run.run_dir / "config.yaml").write_text(cfg.to_yaml())
    prepare([CONFIG, *common, "optim.lr=1e-3"])  # the same model: a continued run
    message, seconds = refused(["model.d_model=128"], common, ConfigError)
    assert message.startswith("config run.name='a': the run directory"), message
    assert "model.d_model 64 there, 128 here" in message and "new run.name" in message
    assert seconds < SECOND
    assert group_starts == []
