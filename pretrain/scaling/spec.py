"""The sweep spec (YAML) and the grid of runs it defines, from the config alone: `pretrain-sweep
plan` needs no dataset and no accelerator (torch is imported, for pretrain.optim's schedule).

A spec names a base run config, a model ladder (explicit shapes, or a depth rule: d_model =
width_per_layer * depth), budgets (token counts, or FLOPs: IsoFLOP profiles), and the schedule.
With `schedule: wsd` each size trains once, to its largest budget, saving checkpoints on the
way; every smaller budget of that size is a cooldown branched from the last checkpoint at or
before its own cooldown start (exact: the schedules agree up to there, pretrain.optim). With
`schedule: cosine` every point is an independent run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pretrain.config import Config, ConfigError, apply_overrides, from_dict, resolve_vocab
from pretrain.models.flops import flops_per_token, param_count
from pretrain.optim import wsd_cooldown_start

SPEC_KEYS = (
    "name",
    "base",
    "overrides",
    "output_dir",
    "nproc",
    "ladder",
    "budgets",
    "schedule",
    "cooldown_fraction",
    "branch_every",
    "embeddings",
    "throughput",
)
SHAPE_KEYS = ("name", "n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden")


def _need(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"sweep {name}", value, fix)


@dataclass
class Point:
    """One run of the grid: a size trained for a budget."""

    id: str
    size: str
    budget: float  # tokens or FLOPs, as the spec gave it
    model: dict[str, Any]  # model.* of this size
    N: int  # parameters, with or without embeddings as the spec says
    steps: int
    D: int  # training tokens
    C: float  # training FLOPs: flops_per_token * D
    branch_of: str | None = None  # the point whose checkpoint this cooldown starts from
    branch_step: int = 0  # that checkpoint's step
    save_every: int = 0  # the longest run of a size: checkpoints its branches start from

    @property
    def trained_steps(self) -> int:
        """Steps this run itself trains (a branch starts at branch_step)."""
        return self.steps - self.branch_step


@dataclass
class Spec:
    name: str
    base: Path
    overrides: list[str]
    output_dir: Path
    nproc: int
    shapes: list[dict[str, Any]]
    budget_kind: str  # "tokens" or "flops"
    budgets: list[float]
    schedule: str
    cooldown_fraction: float
    branch_every: int | None
    embeddings: bool
    throughput: float  # achieved training FLOP/s per process (the plan's time estimates)
    points: list[Point] = field(default_factory=list)
    base_cfg: Config | None = None

    @property
    def sweep_dir(self) -> Path:
        return self.output_dir / self.name

    def point(self, pid: str) -> Point:
        return next(p for p in self.points if p.id == pid)


def _ladder(raw: Any) -> list[dict[str, Any]]:
    _need(isinstance(raw, dict), "ladder", raw, "use a mapping with 'shapes' or 'rule'")
    _need(
        set(raw) in ({"shapes"}, {"rule"}),
        "ladder",
        sorted(raw),
        "give exactly one of 'shapes' (a list of model shapes) or 'rule'",
    )
    if "shapes" in raw:
        shapes = raw["shapes"]
        _need(isinstance(shapes, list) and len(shapes) >= 1, "ladder.shapes", shapes, "a list")
        out = []
        for i, s in enumerate(shapes):
            _need(isinstance(s, dict), f"ladder.shapes[{i}]", s, "a mapping of model keys")
            bad = sorted(set(s) - set(SHAPE_KEYS))
            _need(not bad, f"ladder.shapes[{i}]", bad, f"unknown keys; valid: {SHAPE_KEYS}")
            shape = dict(s)
            shape.setdefault("name", f"L{shape.get('n_layers')}-d{shape.get('d_model')}")
            out.append(shape)
        return out
    rule = raw["rule"]
    keys = ("depths", "width_per_layer", "head_dim")
    _need(
        isinstance(rule, dict) and set(rule) == set(keys),
        "ladder.rule",
        rule,
        f"give {keys}: d_model = width_per_layer * depth, n_heads = d_model / head_dim",
    )
    out = []
    for depth in rule["depths"]:
        d = rule["width_per_layer"] * depth
        _need(
            d % rule["head_dim"] == 0,
            "ladder.rule.head_dim",
            rule["head_dim"],
            f"must divide d_model={d} (depth {depth}); choose width_per_layer a multiple of it",
        )
        out.append(
            {
                "name": f"L{depth}-d{d}",
                "n_layers": depth,
                "d_model": d,
                "n_heads": d // rule["head_dim"],
            }
        )
    return out


def load_spec(
    path: str | Path,
    overrides: Sequence[str] = (),
    vocab_size: int | None = None,
    output_dir: str | Path | None = None,
) -> Spec:
    """Read and check a spec and build its grid. vocab_size: the dataset tokenizer's, needed
    for embedding parameters and FLOPs when the base config leaves model.vocab_size null (the
    CLI reads it from the dataset)."""
    p = Path(path)
    _need(p.is_file(), "spec", str(p), "pass the path of a sweep spec YAML (configs/sweeps/)")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("sweep spec", str(p), f"fix the YAML syntax: {e}") from None
    _need(isinstance(raw, dict), "spec", raw, "use a mapping")
    bad = sorted(set(raw) - set(SPEC_KEYS))
    _need(not bad, "spec keys", bad, f"unknown; valid: {', '.join(SPEC_KEYS)}")
    for key in ("name", "base", "ladder", "budgets"):
        _need(key in raw, key, None, "is required")
    name = str(raw["name"])
    _need(bool(name) and "/" not in name, "name", name, "a non-empty name without '/'")
    base = (p.parent / raw["base"]).resolve()
    _need(base.is_file(), "base", raw["base"], f"no config file {base} (relative to the spec)")
    budgets = raw["budgets"]
    _need(
        isinstance(budgets, dict) and len(budgets) == 1 and set(budgets) <= {"tokens", "flops"},
        "budgets",
        budgets,
        "give one of tokens: [...] (training tokens) or flops: [...] (IsoFLOP profiles)",
    )
    kind, values = next(iter(budgets.items()))
    _need(
        bool(isinstance(values, list) and values and all(_positive(v) for v in values)),
        f"budgets.{kind}",
        values,
        "a non-empty list of positive numbers, e.g. [1.0e+8, 2.0e+8]",
    )
    schedule = raw.get("schedule", "wsd")
    _need(schedule in ("wsd", "cosine"), "schedule", schedule, "use wsd or cosine")
    nproc = raw.get("nproc", 1)
    _need(isinstance(nproc, int) and nproc >= 1, "nproc", nproc, "processes per run, >= 1")
    spec = Spec(
        name=name,
        base=base,
        overrides=list(raw.get("overrides", [])) + list(overrides),
        output_dir=Path(output_dir or raw.get("output_dir", "runs/sweeps")),
        nproc=nproc,
        shapes=_ladder(raw["ladder"]),
        budget_kind=kind,
        budgets=sorted(float(v) for v in values),
        schedule=schedule,
        cooldown_fraction=float(raw.get("cooldown_fraction", 0.2)),
        branch_every=raw.get("branch_every"),
        embeddings=bool(raw.get("embeddings", False)),
        throughput=float(raw.get("throughput", 1.0e10)),
    )
    names = [s["name"] for s in spec.shapes]
    _need(len(set(names)) == len(names), "ladder", names, "give every shape its own name")
    spec.base_cfg = base_config(spec, vocab_size)
    spec.points = build_points(spec)
    return spec


def _positive(v: Any) -> bool:
    try:
        return float(v) > 0 and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def base_config(spec: Spec, vocab_size: int | None) -> Config:
    data = yaml.safe_load(spec.base.read_text()) or {}
    data = apply_overrides(data, spec.overrides)
    data.setdefault("optim", {})
    data["optim"]["schedule"] = spec.schedule
    data["optim"]["cooldown_fraction"] = spec.cooldown_fraction
    cfg = from_dict(data)
    if cfg.model.vocab_size is None and vocab_size is not None:
        cfg = resolve_vocab(cfg, vocab_size)
    return cfg


def size_config(spec: Spec, shape: dict[str, Any], steps: int = 0) -> Config:
    """The base config with this size's model shape (and a run length, when given)."""
    cfg = spec.base_cfg
    model = {k: v for k, v in shape.items() if k != "name"}
    data = cfg.to_dict()
    data["model"].update(model)
    if steps:
        data["run"]["train_steps"] = steps
    return from_dict(data)


def tokens_per_step(cfg: Config, nproc: int) -> int:
    dp, accum = cfg.parallel.layout(nproc)
    return cfg.parallel.micro_batch_size * dp * accum * cfg.model.seq_len


def _flops_per_token(cfg: Config, embeddings: bool) -> int:
    if embeddings and cfg.model.vocab_size is None:
        raise ConfigError(
            "sweep embeddings",
            True,
            "counting embeddings needs model.vocab_size; set it in "
            "the base config, or let pretrain-sweep read it from the dataset",
        )
    return flops_per_token(cfg.model, embeddings=embeddings)


def build_points(spec: Spec) -> list[Point]:
    tps = tokens_per_step(spec.base_cfg, spec.nproc)
    points: list[Point] = []
    for shape in spec.shapes:
        cfg = size_config(spec, shape)
        fpt = _flops_per_token(cfg, spec.embeddings)
        n = param_count(cfg.model, embeddings=spec.embeddings)
        size_points: dict[int, Point] = {}
        for b in spec.budgets:
            tokens = b if spec.budget_kind == "tokens" else b / fpt
            steps = max(1, round(tokens / tps))
            pid = f"{shape['name']}-{'D' if spec.budget_kind == 'tokens' else 'C'}{b:.3g}"
            _need(
                steps not in size_points,
                f"budgets.{spec.budget_kind}",
                b,
                f"gives {steps} steps for {shape['name']}, as another budget does; space the "
                f"budgets further apart",
            )
            size_points[steps] = Point(
                pid,
                shape["name"],
                b,
                cfg.to_dict()["model"],
                n,
                steps,
                steps * tps,
                float(fpt) * steps * tps,
            )
        ordered = [size_points[s] for s in sorted(size_points)]
        if spec.schedule == "wsd":
            _branch(spec, ordered)
        for pt in ordered:
            size_config(spec, shape, pt.steps)  # validates: the warmup ends before the cooldown
        points += ordered
    return points


def _branch(spec: Spec, ordered: list[Point]) -> None:
    """Make every shorter budget of a size a cooldown branched from the longest run."""
    longest = ordered[-1]
    optim = spec.base_cfg.optim
    starts = [wsd_cooldown_start(optim, p.steps) for p in ordered[:-1]]
    every = spec.branch_every or max(1, min(starts, default=1) // 2)
    for pt, start in zip(ordered[:-1], starts, strict=True):
        pt.branch_of = longest.id
        pt.branch_step = start // every * every
        _need(
            pt.branch_step > optim.warmup_steps,
            "budgets",
            pt.budget,
            f"{pt.id}'s cooldown would branch at step {pt.branch_step}, inside the "
            f"{optim.warmup_steps}-step warmup; use larger budgets or a shorter warmup",
        )
    longest.save_every = every if len(ordered) > 1 else 0
