"""pretrain.config: YAML round trip, dotted overrides, every validation error, the parallel
layout, vocabulary padding, the generated reference, and no torch import."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pretrain import config as config_module
from pretrain.config import (
    Config,
    ConfigError,
    ParallelConfig,
    describe,
    from_dict,
    load_config,
    resolve_vocab,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
CONFIG_SOURCE = Path(config_module.__file__)


def sections() -> list[tuple[str, type]]:
    """(section name, dataclass) for every section of Config, in declaration order."""
    hints = typing.get_type_hints(Config)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(Config)]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- round trip, defaults, flatten -------------------------------------------------------------


@pytest.mark.parametrize("name", ["demo.yaml", "tiny.yaml"])
def test_yaml_round_trip(tmp_path, name):
    cfg = load_config(CONFIGS / name)
    assert cfg != Config(), "the shipped config should differ from the defaults"
    again = load_config(write(tmp_path / "again.yaml", cfg.to_yaml()))
    assert again == cfg
    assert again.to_yaml() == cfg.to_yaml()


def test_round_trip_of_non_default_values(tmp_path):
    """Lists, nulls replaced by values, floats in exponent form and strings YAML would
    otherwise read as other types all survive to_yaml -> load_config."""
    cfg = load_config(
        None,
        [
            "checkpoint.exclude_from_loading=[data,rng]",
            "checkpoint.dir=/tmp/ckpts",
            "run.exit_after_minutes=1.5",
            "run.exit_after_steps=7",
            "run.name='true'",
            "run.sample_prompt='def '",
            "optim.eps=1e-12",
            "model.vocab_size=512",
            "model.ffn_hidden=300",
            "parallel.dp=1",
            "parallel.global_batch_size=64",
            "tracking.uri=sqlite:///x.db",
        ],
    )
    again = load_config(write(tmp_path / "c.yaml", cfg.to_yaml()))
    assert again == cfg
    assert again.run.name == "true" and again.run.sample_prompt == "def "
    assert again.checkpoint.exclude_from_loading == ["data", "rng"]


def test_demo_values_are_read_from_the_file():
    raw = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    cfg = load_config(CONFIGS / "demo.yaml")
    for section, values in raw.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == Config()
    for name, cls in sections():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert getattr(getattr(cfg, name), f.name) == default, f"{name}.{f.name}"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "run:\n"])
def test_empty_file_and_empty_section_give_defaults(tmp_path, text):
    assert load_config(write(tmp_path / "c.yaml", text)) == Config()


def test_list_default_is_not_shared():
    a, b = Config(), Config()
    a.checkpoint.exclude_from_loading.append("rng")
    assert b.checkpoint.exclude_from_loading == []


def test_flatten():
    cfg = load_config(CONFIGS / "demo.yaml")
    flat = cfg.flatten()
    expected = {f"{s}.{f.name}" for s, cls in sections() for f in dataclasses.fields(cls)}
    assert set(flat) == expected
    assert "model.n_layers" in flat
    for key, value in flat.items():
        section, name = key.split(".")
        assert value == getattr(getattr(cfg, section), name), key


def test_run_dir_and_checkpoint_dir():
    cfg = load_config(None, ["run.output_dir=out", "run.name=exp"])
    assert cfg.run.run_dir == Path("out") / "exp"
    assert cfg.checkpoint_dir == Path("out") / "exp" / "checkpoints"
    cfg = load_config(None, ["checkpoint.dir=/elsewhere"])
    assert cfg.checkpoint_dir == Path("/elsewhere")


# --- overrides ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, section, key, expected",
    [
        ("model.n_layers=7", "model", "n_layers", 7),
        ("optim.lr=0.002", "optim", "lr", 0.002),
        # YAML 1.1 reads 1e-3 (no dot) as a string; float fields accept it.
        ("optim.lr=2e-3", "optim", "lr", 2e-3),
        ("optim.min_lr=1e-5", "optim", "min_lr", 1e-5),
        ("run.exit_after_minutes=1e-1", "run", "exit_after_minutes", 0.1),
        ("optim.lr=1", "optim", "lr", 1.0),  # int widens to float
        ("model.bias=false", "model", "bias", False),
        ("tracking.enabled=no", "tracking", "enabled", False),
        ("model.recompute=selective", "model", "recompute", "selective"),
        ("run.exit_after_steps=null", "run", "exit_after_steps", None),
        ("model.ffn_hidden=~", "model", "ffn_hidden", None),
        (
            "checkpoint.exclude_from_loading=[data,rng]",
            "checkpoint",
            "exclude_from_loading",
            ["data", "rng"],
        ),
        ("checkpoint.exclude_from_loading=[]", "checkpoint", "exclude_from_loading", []),
        ("run.name=exp1", "run", "name", "exp1"),
        ("run.name=1e-3", "run", "name", "1e-3"),  # a string field keeps YAML's string
        ("run.sample_prompt=a=b", "run", "sample_prompt", "a=b"),  # split at the first '='
        ("run.sample_prompt=", "run", "sample_prompt", ""),
        ("run.precision=bf16", "run", "precision", "bf16"),
    ],
)
def test_override_values(tmp_path, override, section, key, expected):
    # On top of a file that sets the key to something else where it can, so the override
    # visibly wins over the file.
    base = load_config(CONFIGS / "demo.yaml")
    cfg = load_config(CONFIGS / "demo.yaml", [override])
    got = getattr(getattr(cfg, section), key)
    assert got == expected
    assert type(got) is type(expected)
    # Every other value is the file's.
    changed = {k for k, v in cfg.flatten().items() if base.flatten()[k] != v}
    assert changed <= {f"{section}.{key}"}


def test_override_replaces_file_value_with_null(tmp_path):
    path = write(tmp_path / "c.yaml", "run:\n  exit_after_steps: 5\nmodel:\n  ffn_hidden: 64\n")
    assert load_config(path).run.exit_after_steps == 5
    cfg = load_config(path, ["run.exit_after_steps=null", "model.ffn_hidden=null"])
    assert cfg.run.exit_after_steps is None and cfg.model.ffn_hidden is None


def test_float_in_exponent_form_from_a_file(tmp_path):
    path = write(tmp_path / "c.yaml", "optim:\n  lr: 1e-3\n  min_lr: 5e-5\n")
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == "1e-3"  # what YAML 1.1 gives
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-3 and cfg.optim.min_lr == 5e-5


def test_later_override_wins():
    assert load_config(None, ["model.n_layers=3", "model.n_layers=5"]).model.n_layers == 5


def test_override_creates_a_section_missing_from_the_file():
    raw = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    missing = [name for name, _ in sections() if name not in raw]
    assert missing, "demo.yaml has every section; pick another file for this test"
    for section in missing:
        key, value = _some_override(section).split("=")
        cfg = load_config(CONFIGS / "demo.yaml", [f"{section}.{key}={value}"])
        assert str(getattr(getattr(cfg, section), key)) == value
        assert str(getattr(getattr(Config(), section), key)) != value


def _some_override(section: str) -> str:
    """A valid key=value for any section that differs from the default."""
    return {
        "run": "seed=7",
        "model": "n_layers=3",
        "data": "shuffle_window=3",
        "optim": "beta1=0.5",
        "parallel": "micro_batch_size=3",
        "checkpoint": "keep_last=9",
        "tracking": "experiment=other",
        "reliability": "spike_window=64",
    }[section]


def test_overrides_do_not_touch_the_file(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  n_layers: 2\n")
    load_config(path, ["model.n_layers=9", "tracking.enabled=false"])
    assert path.read_text() == "model:\n  n_layers: 2\n"


# --- validation errors --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One call that must raise ConfigError(field, value) with `fix` in its message."""

    id: str
    call: Callable[[Path], object]
    field: str
    value: object
    fix: str = ""


def ov(id: str, overrides: list[str], field: str, value: object, fix: str = "") -> Case:
    """A case: the defaults plus `overrides`."""
    return Case(id, lambda tmp: load_config(None, overrides), field, value, fix)


def from_file(
    id: str, text: str, field: str, value: object, fix: str = "", overrides: tuple[str, ...] = ()
) -> Case:
    """A case: a YAML file holding `text`."""

    def call(tmp: Path):
        return load_config(write(tmp / "c.yaml", text), list(overrides))

    return Case(id, call, field, value, fix)


# Every _need of every section's validate() and of Config.validate(); the completeness test
# below fails when validate() gains a check without a case here.
VALIDATE_CASES = [
    # performance reporting (docs/performance.md)
    ov("run.peak_flops", ["run.peak_flops=0"], "run.peak_flops", 0.0, "FLOP/s > 0"),
    ov(
        "run.profile_steps",
        ["run.profile_steps=[5,2]"],
        "run.profile_steps",
        [5, 2],
        "1 <= first <= last",
    ),
    # attention patterns (docs/models.md)
    ov(
        "model.attention-family",
        ["model.attention=longformer"],
        "model.attention",
        "longformer",
        "sliding_window",
    ),
    ov(
        "model.attention_window",
        ["model.attention=sliding_window", "model.attention_window=0"],
        "model.attention_window",
        0,
        "integer >= 1",
    ),
    ov(
        "model.window_layers-range",
        ["model.attention=sliding_window", "model.n_layers=2", "model.window_layers=[2]"],
        "model.window_layers",
        [2],
        "block indices are 0..1",
    ),
    ov(
        "model.window_layers-without-window",
        ["model.window_layers=[0]"],
        "model.window_layers",
        [0],
        "sliding_window",
    ),
    ov(
        "model.global_positions",
        ["model.family=bert", "model.seq_len=16", "model.global_positions=[16]"],
        "model.global_positions",
        [16],
        "positions are 0..15",
    ),
    # warmup-stable-decay and sweeps (docs/scaling-laws.md)
    ov(
        "run.branch_from",
        ["run.resume=never", "run.branch_from=runs/a/checkpoints/step_00000010"],
        "run.branch_from",
        "runs/a/checkpoints/step_00000010",
        "run.resume=auto",
    ),
    ov("optim.cooldown_fraction", ["optim.cooldown_fraction=0"], "optim.cooldown_fraction", 0.0),
    ov(
        "optim.warmup_steps-wsd",
        ["optim.schedule=wsd", "run.train_steps=20", "optim.warmup_steps=17"],
        "optim.warmup_steps",
        17,
        "at most 16 steps",
    ),
    ov("tracking.tags", ["tracking.tags=[novalue]"], "tracking.tags[0]", "novalue", "KEY=VALUE"),
    # run.compile: combinations refused before anything starts (docs/performance.md)
    ov(
        "run.compile-zero3",
        ["run.compile=true", "parallel.zero_stage=3"],
        "parallel.zero_stage",
        3,
        "run.compile=false",
    ),
    ov(
        "run.compile-moe",
        ["run.compile=true", "model.moe_experts=8"],
        "model.moe_experts",
        8,
        "run.compile=false",
    ),
    # model: mixture of experts (docs/moe.md)
    ov("model.moe_experts-negative", ["model.moe_experts=-1"], "model.moe_experts", -1, ">= 2"),
    ov("model.moe_experts-one", ["model.moe_experts=1"], "model.moe_experts", 1, "at least 2"),
    ov("model.moe_every", ["model.moe_experts=8", "model.moe_every=0"], "model.moe_every", 0),
    ov("model.moe_top_k", ["model.moe_experts=8", "model.moe_top_k=3"], "model.moe_top_k", 3),
    ov(
        "model.moe_capacity_factor",
        ["model.moe_experts=8", "model.moe_capacity_factor=0"],
        "model.moe_capacity_factor",
        0.0,
        "> 0",
    ),
    ov(
        "model.moe_min_capacity",
        ["model.moe_experts=8", "model.moe_min_capacity=-1"],
        "model.moe_min_capacity",
        -1,
    ),
    ov("model.moe_jitter", ["model.moe_experts=8", "model.moe_jitter=1"], "model.moe_jitter", 1.0),
    ov(
        "model.moe_aux_loss_weight",
        ["model.moe_experts=8", "model.moe_aux_loss_weight=-1"],
        "model.moe_aux_loss_weight",
        -1.0,
    ),
    ov("parallel.ep-zero", ["parallel.ep=0"], "parallel.ep", 0, ">= 1"),
    ov("parallel.ep-dense", ["parallel.ep=2"], "parallel.ep", 2, "moe_experts > 0"),
    ov(
        "parallel.ep-experts",
        ["model.moe_experts=8", "parallel.ep=3"],
        "parallel.ep",
        3,
        "must divide by ep",
    ),
    ov("moe-with-pp", ["model.moe_experts=8", "parallel.pp=2"], "parallel.pp", 2, "pipeline"),
    ov(
        "model.moe_min_capacity-tokens",
        ["model.moe_experts=8", "model.moe_min_capacity=5000"],
        "model.moe_min_capacity",
        5000,
        "tokens of a micro-batch",
    ),
    # run
    ov("run.name-empty", ["run.name="], "run.name", "", "non-empty"),
    ov("run.name-slash", ["run.name=a/b"], "run.name", "a/b", "without '/'"),
    ov("run.train_steps", ["run.train_steps=0"], "run.train_steps", 0, ">= 1"),
    ov("run.log_interval", ["run.log_interval=0"], "run.log_interval", 0, ">= 1"),
    ov("run.eval_interval", ["run.eval_interval=-1"], "run.eval_interval", -1, ">= 0"),
    ov("run.eval_batches", ["run.eval_batches=-1"], "run.eval_batches", -1, ">= 0"),
    ov("run.sample_tokens", ["run.sample_tokens=-1"], "run.sample_tokens", -1, ">= 0"),
    ov("run.exit_after_steps", ["run.exit_after_steps=0"], "run.exit_after_steps", 0, ">= 1"),
    ov(
        "run.exit_after_minutes",
        ["run.exit_after_minutes=0"],
        "run.exit_after_minutes",
        0.0,
        "positive",
    ),
    ov("run.resume-blank", ["run.resume='  '"], "run.resume", "  ", "'auto', 'never'"),
    # model
    ov("model.n_layers", ["model.n_layers=0"], "model.n_layers", 0, ">= 1"),
    ov("model.d_model", ["model.d_model=0"], "model.d_model", 0, ">= 1"),
    ov("model.n_heads-zero", ["model.n_heads=0"], "model.n_heads", 0, ">= 1"),
    ov("model.seq_len", ["model.seq_len=0"], "model.seq_len", 0, ">= 1"),
    ov("model.vocab_multiple", ["model.vocab_multiple=0"], "model.vocab_multiple", 0, ">= 1"),
    ov(
        "model.n_heads-divides",
        ["model.d_model=128", "model.n_heads=5"],
        "model.n_heads",
        5,
        "d_model=128 must divide by n_heads",
    ),
    ov(
        "model.n_heads-rope-odd",
        ["model.positions=rope", "model.d_model=12", "model.n_heads=4"],
        "model.n_heads",
        4,
        "even head size",
    ),
    ov("model.ffn_hidden", ["model.ffn_hidden=0"], "model.ffn_hidden", 0, ">= 1"),
    ov("model.vocab_size", ["model.vocab_size=1"], "model.vocab_size", 1, ">= 2"),
    ov("model.dropout-one", ["model.dropout=1.0"], "model.dropout", 1.0, "[0, 1)"),
    ov("model.dropout-negative", ["model.dropout=-0.1"], "model.dropout", -0.1, "[0, 1)"),
    ov(
        "model.recompute_interval",
        ["model.recompute=full", "model.recompute_interval=0"],
        "model.recompute_interval",
        0,
        ">= 1",
    ),
    ov(
        "model.recompute_interval-without-recompute",
        ["model.recompute_interval=2"],
        "model.recompute_interval",
        2,
        "no effect with model.recompute=none",
    ),
    ov("model.init_std", ["model.init_std=0"], "model.init_std", 0.0, "positive"),
    ov("model.norm_eps", ["model.norm_eps=0"], "model.norm_eps", 0.0, "positive"),
    ov("model.rope_theta", ["model.rope_theta=-1"], "model.rope_theta", -1.0, "positive"),
    ov(
        "model.n_decoder_layers",
        ["model.n_decoder_layers=0"],
        "model.n_decoder_layers",
        0,
        ">= 1, or null",
    ),
    ov(
        "model.n_kv_heads-divides",
        ["model.n_heads=4", "model.n_kv_heads=3"],
        "model.n_kv_heads",
        3,
        "must divide n_heads=4; valid: [1, 2, 4]",
    ),
    ov("model.n_kv_heads-zero", ["model.n_kv_heads=0"], "model.n_kv_heads", 0, "must divide"),
    ov(
        "model.positions-relative-not-t5",
        ["model.positions=relative"],
        "model.positions",
        "relative",
        "T5's position bias",
    ),
    ov(
        "model.positions-t5-not-relative",
        ["model.family=t5", "model.positions=rope"],
        "model.positions",
        "rope",
        "T5 uses positions: relative",
    ),
    ov(
        "model.rel_buckets",
        ["model.family=t5", "model.positions=relative", "model.rel_buckets=7"],
        "model.rel_buckets",
        7,
        "even number >= 4",
    ),
    ov(
        "model.rel_max_distance",
        ["model.family=t5", "model.positions=relative", "model.rel_max_distance=16"],
        "model.rel_max_distance",
        16,
        "must exceed rel_buckets/2=16",
    ),
    # data
    ov("data.shuffle_window", ["data.shuffle_window=0"], "data.shuffle_window", 0, ">= 1"),
    ov(
        "data.shuffle_run",
        ["data.shuffle_window=64", "data.shuffle_run=3"],
        "data.shuffle_run",
        3,
        "divides data.shuffle_window=64",
    ),
    ov("data.blend-no-path", ["data.blend=['0.5']"], "data.blend[0]", "0.5", "'WEIGHT PATH'"),
    ov(
        "data.blend-weight",
        ["data.blend=['1 a', '-2 b']"],
        "data.blend[1]",
        "-2 b",
        "positive number",
    ),
    ov("data.mask_prob", ["data.mask_prob=0"], "data.mask_prob", 0.0, "(0, 1)"),
    ov("data.noise_density", ["data.noise_density=1"], "data.noise_density", 1.0, "(0, 1)"),
    ov("data.mean_span", ["data.mean_span=0.5"], "data.mean_span", 0.5, ">= 1"),
    ov("data.num_workers", ["data.num_workers=-1"], "data.num_workers", -1, ">= 0"),
    ov("data.prefetch", ["data.prefetch=0"], "data.prefetch", 0, ">= 1"),
    # optim
    ov("optim.lr", ["optim.lr=0"], "optim.lr", 0.0, "positive"),
    ov(
        "optim.min_lr-above-lr",
        ["optim.lr=0.001", "optim.min_lr=0.01"],
        "optim.min_lr",
        0.01,
        "optim.lr=0.001",
    ),
    ov("optim.min_lr-negative", ["optim.min_lr=-0.1"], "optim.min_lr", -0.1, "[0, optim.lr="),
    ov("optim.warmup_steps-negative", ["optim.warmup_steps=-1"], "optim.warmup_steps", -1, ">= 0"),
    ov("optim.decay_steps", ["optim.decay_steps=0"], "optim.decay_steps", 0, ">= 1"),
    ov("optim.weight_decay", ["optim.weight_decay=-0.1"], "optim.weight_decay", -0.1, ">= 0"),
    ov("optim.beta1", ["optim.beta1=1.0"], "optim.beta1", 1.0, "[0, 1)"),
    ov("optim.beta2", ["optim.beta2=-0.5"], "optim.beta2", -0.5, "[0, 1)"),
    ov("optim.eps", ["optim.eps=0"], "optim.eps", 0.0, "positive"),
    ov("optim.grad_clip", ["optim.grad_clip=-1"], "optim.grad_clip", -1.0, ">= 0"),
    # parallel
    ov("parallel.tp", ["parallel.tp=0"], "parallel.tp", 0, ">= 1"),
    ov("parallel.pp", ["parallel.pp=0"], "parallel.pp", 0, ">= 1"),
    ov(
        "parallel.zero_stage-with-pp",
        ["parallel.pp=2", "parallel.zero_stage=2"],
        "parallel.zero_stage",
        2,
        "use parallel.zero_stage=1",
    ),
    ov(
        "parallel.pp-more-than-blocks",
        ["parallel.pp=8", "model.n_layers=4"],
        "parallel.pp",
        8,
        "parallel.pp <= 4",
    ),
    ov(
        "parallel.pp-uniform-indivisible",
        ["parallel.pp=3", "model.n_layers=4", "parallel.pipeline_partition=uniform"],
        "parallel.pp",
        3,
        "pipeline_partition=parameters",
    ),
    ov(
        "parallel.micro_batch_size",
        ["parallel.micro_batch_size=0"],
        "parallel.micro_batch_size",
        0,
        ">= 1",
    ),
    ov("parallel.dp", ["parallel.dp=0"], "parallel.dp", 0, ">= 1"),
    ov("parallel.zero_stage", ["parallel.zero_stage=4"], "parallel.zero_stage", 4, "0, 1, 2 or 3"),
    ov(
        "parallel.global_batch_size",
        ["parallel.global_batch_size=0"],
        "parallel.global_batch_size",
        0,
        ">= 1",
    ),
    # checkpoint
    ov("checkpoint.interval", ["checkpoint.interval=-1"], "checkpoint.interval", -1, ">= 0"),
    ov("checkpoint.keep_last", ["checkpoint.keep_last=-1"], "checkpoint.keep_last", -1, ">= 0"),
    ov("checkpoint.keep_every", ["checkpoint.keep_every=-5"], "checkpoint.keep_every", -5, ">= 0"),
    ov(
        "checkpoint.exclude_from_loading",
        ["checkpoint.exclude_from_loading=[data,optimiser]"],
        "checkpoint.exclude_from_loading",
        "optimiser",
        "did you mean 'optimizer'?",
    ),
    # tracking
    ov("tracking.experiment", ["tracking.experiment="], "tracking.experiment", "", "non-empty"),
    ov(
        "tracking.flush_timeout",
        ["tracking.flush_timeout=-1"],
        "tracking.flush_timeout",
        -1.0,
        ">= 0",
    ),
    ov(
        "tracking.metrics_interval",
        ["tracking.metrics_interval=-1"],
        "tracking.metrics_interval",
        -1.0,
        "0: send every log step",
    ),
    ov(
        "reliability.max_consecutive_skips",
        ["reliability.max_consecutive_skips=0"],
        "reliability.max_consecutive_skips",
        0,
        ">= 1",
    ),
    ov(
        "reliability.spike_sigma",
        ["reliability.spike_sigma=0"],
        "reliability.spike_sigma",
        0.0,
        "> 0",
    ),
    ov(
        "reliability.spike_window",
        ["reliability.spike_window=1"],
        "reliability.spike_window",
        1,
        ">= 2",
    ),
    ov(
        "reliability.collective_timeout_s",
        ["reliability.collective_timeout_s=0"],
        "reliability.collective_timeout_s",
        0.0,
        "positive number of seconds",
    ),
    ov(
        "reliability.startup_timeout_s",
        ["reliability.startup_timeout_s=-1"],
        "reliability.startup_timeout_s",
        -1.0,
        "positive number of seconds",
    ),
    ov(
        "reliability.step_timeout_s",
        ["reliability.step_timeout_s=0"],
        "reliability.step_timeout_s",
        0.0,
        "or null",
    ),
    ov(
        "reliability.inject",
        ["reliability.inject=[boom@3]"],
        "reliability.inject[0]",
        "boom@3",
        "KIND@STEP",
    ),
    # cross-section (Config.validate)
    ov(
        "warmup-exceeds-train_steps",
        ["run.train_steps=100", "optim.warmup_steps=101"],
        "optim.warmup_steps",
        101,
        "decay length 100",
    ),
    ov(
        "warmup-exceeds-decay_steps",
        ["run.train_steps=1000", "optim.decay_steps=50", "optim.warmup_steps=60"],
        "optim.warmup_steps",
        60,
        "decay length 50",
    ),
    ov(
        "bf16-without-zero",
        ["run.precision=bf16", "parallel.zero_stage=0"],
        "parallel.zero_stage",
        0,
        "set parallel.zero_stage=1",
    ),
    ov(
        "vocab_size-not-divisible-by-tp",
        ["model.vocab_size=1001", "parallel.tp=2"],
        "model.vocab_size",
        1001,
        "must divide by parallel.tp=2",
    ),
    ov(
        "n_heads-not-divisible-by-tp",
        ["model.d_model=96", "model.n_heads=6", "parallel.tp=4"],
        "model.n_heads",
        6,
        "must divide by parallel.tp=4; nearest valid n_heads: [4, 8], or parallel.tp in",
    ),
    ov(
        "n_kv_heads-not-divisible-by-tp",
        ["model.n_heads=8", "model.n_kv_heads=2", "parallel.tp=4"],
        "model.n_kv_heads",
        2,
        "nearest valid n_kv_heads: [4, 8], or parallel.tp in [1, 2]",
    ),
    ov(
        "ffn_hidden-not-divisible-by-tp",
        ["model.ffn_hidden=100", "parallel.tp=8", "model.n_heads=8"],
        "model.ffn_hidden",
        100,
        "nearest valid ffn_hidden: [96, 104]",
    ),
    ov(
        "seq_len-not-divisible-for-sequence-parallel",
        ["model.seq_len=30", "parallel.tp=4", "parallel.sequence_parallel=true"],
        "model.seq_len",
        30,
        "nearest valid seq_len: [28, 32]",
    ),
]

# Decoding: types, unknown names, malformed overrides, files.
DECODE_CASES = [
    ov("str-for-int", ["run.seed=abc"], "run.seed", "abc", "use an integer"),
    ov("float-for-int", ["parallel.zero_stage=1.5"], "parallel.zero_stage", 1.5, "use an integer"),
    ov("bool-for-int", ["run.train_steps=true"], "run.train_steps", True, "use an integer"),
    ov("null-for-int", ["run.seed=null"], "run.seed", None, "use an integer"),
    ov("int-for-bool", ["model.bias=1"], "model.bias", 1, "true or false"),
    ov("str-for-bool", ["tracking.enabled=maybe"], "tracking.enabled", "maybe", "true or false"),
    ov("bool-for-float", ["optim.lr=true"], "optim.lr", True, "use a number"),
    ov("word-for-float", ["optim.lr=fast"], "optim.lr", "fast", "use a number"),
    ov("list-for-float", ["optim.lr=[1]"], "optim.lr", [1], "use a number"),
    ov("int-for-str", ["run.name=123"], "run.name", 123, "use a string"),
    ov(
        "non-list-for-list",
        ["checkpoint.exclude_from_loading=data"],
        "checkpoint.exclude_from_loading",
        "data",
        "use a list",
    ),
    ov(
        "int-in-list",
        ["checkpoint.exclude_from_loading=[data,1]"],
        "checkpoint.exclude_from_loading[1]",
        1,
        "use a string",
    ),
    ov(
        "bad-literal",
        ["run.precision=bf61"],
        "run.precision",
        "bf61",
        "use one of ['fp32', 'bf16']; did you mean 'bf16'?",
    ),
    ov(
        "bad-literal-positions",
        ["model.positions=rop"],
        "model.positions",
        "rop",
        "did you mean 'rope'?",
    ),
    ov(
        "unknown-key",
        ["model.n_layer=2"],
        "model.n_layer",
        2,
        "unknown key; valid keys: family, n_layers",
    ),
    ov(
        "unknown-section-override",
        ["modle.n_layers=2"],
        "modle.n_layers",
        2,
        "unknown section; valid: run, model",
    ),
    ov(
        "override-without-equals",
        ["model.n_layers"],
        "override",
        "model.n_layers",
        "section.key=value",
    ),
    ov("dotted-key", ["model.n_layers.x=1"], "model.n_layers.x", 1, "unknown key"),
    ov("override-without-section", ["n_layers=2"], "override", "n_layers=2", "section.key=value"),
    from_file(
        "unknown-key-in-file",
        "model:\n  n_layer: 2\n",
        "model.n_layer",
        2,
        "did you mean 'n_layers'?",
    ),
    from_file(
        "unknown-section-in-file",
        "modle:\n  n_layers: 2\n",
        "modle",
        {"n_layers": 2},
        "did you mean 'model'?",
    ),
    from_file("section-not-a-mapping", "run: 5\n", "run", 5, "mapping"),
    from_file(
        "section-not-a-mapping-with-override",
        "run: 5\n",
        "run",
        5,
        "mapping",
        overrides=("run.seed=1",),
    ),
    from_file("top-level-not-a-mapping", "- a\n- b\n", "config", ["a", "b"], "mapping"),
    from_file("not-a-mapping-with-override", "- a\n", "config", ["a"], "mapping", ("run.seed=1",)),
    from_file("infinite-float", "optim:\n  lr: .inf\n", "optim.lr", float("inf"), "finite"),
]


def _missing_file(tmp: Path):
    return load_config(tmp / "nope.yaml")


def _directory_as_file(tmp: Path):
    return load_config(tmp)


def _bad_yaml(tmp: Path):
    return load_config(write(tmp / "c.yaml", "model:\n  n_layers: [2\n"))


FILE_CASES = [
    Case("missing-config-file", _missing_file, "config file", "<tmp>/nope.yaml", "existing YAML"),
    Case("directory-as-config-file", _directory_as_file, "config file", "<tmp>", "existing YAML"),
    Case("yaml-syntax-error", _bad_yaml, "config file", "<tmp>/c.yaml", "fix the YAML syntax"),
]

ALL_CASES = VALIDATE_CASES + DECODE_CASES + FILE_CASES


def _expect(case: Case, tmp: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        case.call(tmp)
    err = info.value
    value = case.value
    if isinstance(value, str) and value.startswith("<tmp>"):
        value = str(tmp) + value[len("<tmp>") :]
    assert err.field_name == case.field
    assert err.value == value and type(err.value) is type(value)
    message = str(err)
    assert message.startswith(f"config {case.field}={value!r}: ")
    assert case.fix in message
    return err


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_config_error_names_field_and_value(tmp_path, case):
    _expect(case, tmp_path)


def test_yaml_syntax_error_says_where(tmp_path):
    with pytest.raises(ConfigError) as info:
        _bad_yaml(tmp_path)
    assert "line" in str(info.value)  # yaml's own position report is kept
    assert info.value.__suppress_context__  # `from None`: one clean error, not a chain


def test_n_heads_error_lists_valid_head_counts():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.d_model=96", "model.n_heads=7"])
    found = re.search(r"valid n_heads: \[([\d, ]+)\]", str(info.value))
    assert found, str(info.value)
    suggested = [int(x) for x in found.group(1).split(",")]
    assert suggested and all(96 % h == 0 for h in suggested)
    for h in suggested:  # each suggestion passes
        assert load_config(None, ["model.d_model=96", f"model.n_heads={h}"]).model.n_heads == h


def test_vocab_tp_error_suggests_a_valid_size():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.vocab_size=1001", "parallel.tp=4"])
    found = re.search(r"nearest valid: (\d+)", str(info.value))
    assert found, str(info.value)
    suggested = int(found.group(1))
    assert suggested >= 1001
    load_config(None, [f"model.vocab_size={suggested}", "parallel.tp=4"])  # accepted


@pytest.mark.parametrize(
    "field, overrides",
    [
        ("n_heads", ["model.d_model=96", "model.n_heads=6", "parallel.tp=4"]),
        ("n_kv_heads", ["model.n_heads=8", "model.n_kv_heads=2", "parallel.tp=4"]),
        ("ffn_hidden", ["model.ffn_hidden=100", "model.n_heads=8", "parallel.tp=8"]),
    ],
)
def test_tp_errors_suggest_valid_values(field, overrides):
    """Each suggested value, and each suggested TP size, passes validation."""
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    found = re.search(
        rf"nearest valid {field}: \[([\d, ]+)\], or parallel.tp in \[([\d, ]+)\]", str(info.value)
    )
    assert found, str(info.value)
    for value in (int(x) for x in found.group(1).split(",")):
        load_config(None, [*overrides, f"model.{field}={value}"])
    for tp in (int(x) for x in found.group(2).split(",")):
        cfg = load_config(None, [*overrides[:-1], f"parallel.tp={tp}"])
        assert getattr(cfg.model, field if field != "n_kv_heads" else "kv_heads") % tp == 0


def test_no_suggestion_when_nothing_is_close():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.zzzzzz=1"])
    assert "did you mean" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["run.device=xyzzy"])
    assert "did you mean" not in str(info.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_from_dict_validates():
    assert from_dict({"model": {"n_layers": 3}}).model.n_layers == 3
    with pytest.raises(ConfigError, match=r"config model\.n_layers=0"):
        from_dict({"model": {"n_layers": 0}})


# Completeness: the cases above reach every _need call in pretrain/config.py, and for the
# ones in a validate() method, every field name that call can report.


def _need_calls() -> list[tuple[ast.Call, str, set[str]]]:
    """(call node, enclosing function name, field names it can report) for every _need call.
    A name like f"run.{name}" inside `for name in ("a", "b")` expands to run.a and run.b."""
    tree = ast.parse(CONFIG_SOURCE.read_text())
    found: list[tuple[ast.Call, str, set[str]]] = []

    def visit(node: ast.AST, func: str, loops: dict[str, list[str]]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func, loops = node.name, {}
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name):
            it = node.iter
            if isinstance(it, (ast.Tuple, ast.List)) and all(
                isinstance(e, ast.Constant) for e in it.elts
            ):
                loops = {**loops, node.target.id: [e.value for e in it.elts]}
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "_need"
        ):
            found.append((node, func, _names(node.args[1], loops)))
        for child in ast.iter_child_nodes(node):
            visit(child, func, loops)

    visit(tree, "", {})
    return found


def _names(arg: ast.expr, loops: dict[str, list[str]]) -> set[str]:
    if isinstance(arg, ast.Constant):
        return {arg.value}
    if isinstance(arg, ast.JoinedStr):
        names = {""}
        for part in arg.values:
            if isinstance(part, ast.Constant):
                names = {n + part.value for n in names}
            elif isinstance(part.value, ast.Name) and part.value.id in loops:
                names = {n + v for n in names for v in loops[part.value.id]}
            else:
                return set()  # computed at run time: only the call site is checked
        return names
    return set()


def _raising_need_line(err: ConfigError) -> int | None:
    """Line of the _need call that raised `err` (the frame in config.py that called _need)."""
    tb, caller_line = err.__traceback__, None
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "_need" and Path(code.co_filename) == CONFIG_SOURCE:
            return caller_line
        if Path(code.co_filename) == CONFIG_SOURCE:
            caller_line = tb.tb_lineno
        tb = tb.tb_next
    return None


LAYOUT_ERROR_CALLS = [
    lambda: ParallelConfig(tp=4).layout(6),
    lambda: ParallelConfig(dp=3).layout(4),
    lambda: ParallelConfig(ep=2).layout(3),
    lambda: ParallelConfig(micro_batch_size=8, global_batch_size=40).layout(2),
    lambda: resolve_vocab(load_config(None, ["model.vocab_size=100"]), 300),
    lambda: resolve_vocab(load_config(None, ["model.tokenizer_vocab=200"]), 300),
]


def test_every_need_call_has_a_case(tmp_path):
    calls = _need_calls()
    assert len(calls) >= 20, "the AST scan found too few _need calls; is it still working?"
    hit: set[tuple[int, str]] = set()
    for i, case in enumerate(ALL_CASES):
        tmp = tmp_path / str(i)
        tmp.mkdir()
        try:
            case.call(tmp)
        except ConfigError as e:
            line = _raising_need_line(e)
            if line is not None:
                hit.add((line, e.field_name))
    for call in LAYOUT_ERROR_CALLS:
        with pytest.raises(ConfigError) as info:
            call()
        hit.add((_raising_need_line(info.value), info.value.field_name))

    def covers(node: ast.Call, line: int) -> bool:
        return node.lineno <= line <= node.end_lineno

    missing_sites, missing_fields = [], []
    for node, func, names in calls:
        fields_hit = {f for line, f in hit if covers(node, line)}
        if not fields_hit:
            missing_sites.append(f"line {node.lineno} in {func}()")
        elif func == "validate" and names - fields_hit:
            missing_fields.append(f"line {node.lineno}: {sorted(names - fields_hit)}")
    assert not missing_sites, f"_need calls no case reaches: {missing_sites}"
    assert not missing_fields, f"validate() fields no case reports: {missing_fields}"


# --- ParallelConfig.layout --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, world, dp, accum",
    [
        ({}, 1, 1, 1),
        ({}, 8, 8, 1),  # all data parallel; global batch defaults to micro * dp
        ({"tp": 2}, 8, 4, 1),
        ({"tp": 2, "pp": 2}, 8, 2, 1),
        ({"micro_batch_size": 4, "global_batch_size": 32}, 2, 2, 4),  # 32 = 4 * 2 * 4
        ({"tp": 2, "micro_batch_size": 2, "global_batch_size": 24}, 6, 3, 4),  # 24 = 2 * 3 * 4
        ({"dp": 4, "micro_batch_size": 1, "global_batch_size": 4}, 4, 4, 1),
    ],
)
def test_layout(kw, world, dp, accum):
    assert ParallelConfig(**kw).layout(world) == (dp, accum)


LAYOUT_GRID = [
    (world, tp, pp, micro, accum)
    for world in (1, 2, 4, 6, 8, 12)
    for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2))
    for micro, accum in ((1, 1), (4, 3))
    if world % (tp * pp) == 0
]


@pytest.mark.parametrize("world, tp, pp, micro, accum", LAYOUT_GRID)
def test_layout_invariants(world, tp, pp, micro, accum):
    dp_expected = world // (tp * pp)
    p = ParallelConfig(
        tp=tp, pp=pp, micro_batch_size=micro, global_batch_size=micro * dp_expected * accum
    )
    dp, got_accum = p.layout(world)
    assert dp * tp * pp == world
    assert micro * dp * got_accum == p.global_batch_size
    assert got_accum == accum


def test_layout_world_not_divisible_by_model_parallel():
    with pytest.raises(ConfigError) as info:
        ParallelConfig(tp=4).layout(6)
    assert info.value.field_name == "parallel.tp" and info.value.value == 4
    assert "world size 6" in str(info.value) and "tp*pp=4" in str(info.value)


def test_layout_explicit_dp_mismatch():
    with pytest.raises(ConfigError) as info:
        ParallelConfig(tp=2, dp=3).layout(4)
    msg = str(info.value)
    assert info.value.field_name == "parallel.dp" and info.value.value == 3
    assert "gives dp=2" in msg
    assert "parallel.dp=2" in msg
    assert "launch 6 processes" in msg  # dp 3 * tp 2
    assert ParallelConfig(tp=2, dp=3).layout(6) == (3, 1)  # ... which fits


@pytest.mark.parametrize("micro, world, gbs", [(8, 2, 40), (4, 3, 50), (1, 4, 7), (3, 1, 10)])
def test_layout_global_batch_not_a_multiple(micro, world, gbs):
    per_step = micro * world
    with pytest.raises(ConfigError) as info:
        ParallelConfig(micro_batch_size=micro, global_batch_size=gbs).layout(world)
    assert info.value.field_name == "parallel.global_batch_size" and info.value.value == gbs
    msg = str(info.value)
    assert f"micro_batch_size*dp={per_step}" in msg
    found = re.search(r"nearest valid: (\d+) or (\d+)", msg)
    assert found, msg
    lo, hi = int(found.group(1)), int(found.group(2))
    assert lo % per_step == 0 and hi % per_step == 0
    assert lo < gbs < hi and hi - lo == per_step
    for valid in (lo, hi):
        ParallelConfig(micro_batch_size=micro, global_batch_size=valid).layout(world)


# --- resolve_vocab ------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer_vocab", [1, 256, 300, 4097])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("vocab_multiple", [1, 8, 64])
def test_resolve_vocab_pads(tokenizer_vocab, tp, vocab_multiple):
    cfg = load_config(None, [f"parallel.tp={tp}", f"model.vocab_multiple={vocab_multiple}"])
    out = resolve_vocab(cfg, tokenizer_vocab)
    multiple = vocab_multiple * tp
    size = out.model.vocab_size
    assert size % multiple == 0
    assert tokenizer_vocab <= size < tokenizer_vocab + multiple  # the smallest such size
    assert cfg.model.vocab_size is None  # the input is not modified
    assert dataclasses.replace(out, model=cfg.model) == cfg  # nothing else changes


def test_resolve_vocab_keeps_explicit_size():
    cfg = load_config(None, ["model.vocab_size=1000"])
    assert resolve_vocab(cfg, 300).model.vocab_size == 1000
    assert resolve_vocab(cfg, 1000).model.vocab_size == 1000


def test_resolve_vocab_explicit_too_small():
    cfg = load_config(None, ["model.vocab_size=299"])
    with pytest.raises(ConfigError) as info:
        resolve_vocab(cfg, 300)
    assert info.value.field_name == "model.vocab_size" and info.value.value == 299
    assert "300 tokens" in str(info.value)


# --- describe -----------------------------------------------------------------------------------


def test_describe_documents_every_field():
    text = describe()
    blocks = re.split(r"^## ", text, flags=re.M)[1:]
    by_section = {b.split("\n", 1)[0].strip("` "): b for b in blocks}
    assert list(by_section) == [name for name, _ in sections()]
    for name, cls in sections():
        block = by_section[name]
        for f in dataclasses.fields(cls):
            row = next((ln for ln in block.splitlines() if ln.startswith(f"| `{f.name}` |")), None)
            assert row is not None, f"{name}.{f.name} missing from describe()"
            assert f.metadata["help"] in row, f"{name}.{f.name}: help text"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert f"`{default!r}`" in row, f"{name}.{f.name}: default"


def test_every_field_has_help():
    for name, cls in sections():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"


def test_module_main_prints_describe():
    out = subprocess.run(
        [sys.executable, "-m", "pretrain.config"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=True,
    ).stdout
    assert out.rstrip("\n") == describe().rstrip("\n")


# --- no torch -----------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["pretrain.config", "launch.cli", "launch.torchrun"])
def test_imports_without_torch(module):
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"{module} imports torch (rc={proc.returncode}) {proc.stderr}"


# --- bugs found by these tests, now fixed ------------------------------------------------------


def test_override_into_empty_section(tmp_path):
    path = write(tmp_path / "c.yaml", "run:\nmodel:\n  n_layers: 2\n")
    assert load_config(path).run == Config().run  # accepted without overrides
    assert load_config(path, ["run.seed=7"]).run.seed == 7


def test_override_with_invalid_yaml_value():
    with pytest.raises(ConfigError, match=r"run\.name"):
        load_config(None, ["run.name=[oops"])


def test_non_mapping_file_with_override(tmp_path):
    path = write(tmp_path / "c.yaml", "- a\n")
    with pytest.raises(ConfigError):
        load_config(path, ["run.seed=1"])
