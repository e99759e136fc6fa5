"""Resharding: resume a checkpoint on another layout (TP, PP, DP, ZeRO stage, precision, padding).

DeepSpeed writes each checkpoint for the layout that saved it, and its own loader reads it back
only on that layout (its universal checkpoint covers ZeRO-1/2, and loads ZeRO-3 + TP wrongly:
FEASIBILITY.md). So a resume on another layout goes through a form of our own, made once per
checkpoint in one process and cached in `step_N/universal/`:

- `tensors.safetensors`: for every parameter of the one-process model, under its one-process
  name, the fp32 value and both Adam moments, whole: the data-parallel (ZeRO) partitions joined
  with DeepSpeed's reconstruction (zero_to_fp32's), the pipeline stages' names mapped to the
  model's, the tensor-parallel shards concatenated along the dimension each parameter recorded
  at save time (`tp_dims` in COMPLETE), the vocabulary's padding rows cut off;
- `state.pt`: the optimizer's step count, the LR schedule, DeepSpeed's step counters and the
  client state (trainer step, data position, config);
- `COMPLETE`: the source layout; written last, inside a temporary directory renamed into place.

On the new layout every rank builds its engine as for a fresh start, then copies its own slice
of each tensor in: the module's weight, and the fp32 master and moments through DeepSpeed's
fragment API (`safe_set_full_fp32_param`, `safe_set_full_optimizer_state`), which knows how each
ZeRO stage partitions them. The padding rows of a differently padded vocabulary start at zero;
their logits are masked (layers.mask_padding), so they change nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from pretrain.errors import CheckpointError

UNIVERSAL = "universal"
KINDS = ("param", "exp_avg", "exp_avg_sq")
# Parameters with one row per vocabulary entry (one-process names).
VOCAB_PARAM = re.compile(r"(^|\.)(embed|head)\.weight$|(^|\.)out_bias$")


# --- what changes ------------------------------------------------------------------------------


def layout_of(meta: dict[str, Any]) -> dict[str, Any]:
    """The layout a checkpoint was saved with, from its COMPLETE record."""
    model = meta.get("model") or {}
    return {
        "tp": meta["tp"],
        "pp": meta["pp"],
        "dp": meta["dp"],
        "zero_stage": meta.get("zero_stage", 0),
        "precision": meta.get("precision"),
        "vocab_rows": model.get("vocab_size"),
    }


def changes(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What differs between two layouts in a way DeepSpeed's own loader cannot follow, as
    'name a -> b' strings; empty when the checkpoint loads natively."""
    out = [
        f"{name} {saved[key]} -> {wanted[key]}"
        for key, name in (("tp", "tp"), ("pp", "pp"), ("zero_stage", "ZeRO stage"))
        if saved[key] != wanted[key]
    ]
    if saved["precision"] is not None and saved["precision"] != wanted["precision"]:
        out.append(f"precision {saved['precision']} -> {wanted['precision']}")
    # Data parallelism shards the optimizer state (ZeRO >= 1, also bf16's) and ZeRO-3 weights.
    sharded = saved["zero_stage"] > 0 or saved["precision"] == "bf16"
    if sharded and saved["dp"] != wanted["dp"]:
        out.append(f"dp {saved['dp']} -> {wanted['dp']}")
    if saved["vocab_rows"] is not None and saved["vocab_rows"] != wanted["vocab_rows"]:
        out.append(f"vocabulary rows {saved['vocab_rows']} -> {wanted['vocab_rows']}")
    return out


def check_reshardable(
    path: Path, meta: dict[str, Any], saved_model: dict[str, Any], wanted_rows: int
) -> None:
    """Refuse, before any process group, a checkpoint this module cannot reshard."""
    if "tp_dims" not in meta:
        raise CheckpointError(
            f"checkpoint {path} was saved by an older version, which did not record how its "
            f"tensors are split; resume it with its own layout (tp={meta['tp']}, pp={meta['pp']}, "
            f"dp={meta['dp']}, parallel.zero_stage={meta.get('zero_stage', 0)})"
        )
    if meta.get("zero_stage", 0) == 0 and meta["pp"] > 1:
        raise CheckpointError(
            f"checkpoint {path} is a pipeline (pp={meta['pp']}) checkpoint at ZeRO stage 0, "
            f"whose optimizer files do not name their tensors; resume it with pp={meta['pp']} "
            f"and tp={meta['tp']}"
        )
    saved_rows = saved_model.get("vocab_size")  # absent from checkpoints of older versions
    if saved_model.get("tokenizer_vocab") is None and saved_rows not in (None, wanted_rows):
        # Without the tokenizer's size the padding rows were trained like real ones (older
        # versions did not mask them): they cannot be cut or added without changing the model.
        raise CheckpointError(
            f"checkpoint {path} was saved by an older version with {saved_model['vocab_size']} "
            f"vocabulary rows, this run pads to {wanted_rows}: set "
            f"model.vocab_size={saved_model['vocab_size']}"
        )


# --- consolidation (one process, no process group) ---------------------------------------------


def universal_dir(step_dir: Path) -> Path:
    return step_dir / UNIVERSAL


def ensure_universal(step_dir: Path, say: Callable[[str], None] | None = None) -> Path:
    """The checkpoint's consolidated form, made once: the first process to take the lock writes
    it (into a temporary directory renamed into place), the others wait and reuse it."""
    out = universal_dir(step_dir)
    if (out / "COMPLETE").is_file():
        return out
    with open(step_dir.parent / f".{step_dir.name}.reshard.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "COMPLETE").is_file():
            return out
        start = time.perf_counter()
        for stale in step_dir.glob(f".{UNIVERSAL}-*"):  # a conversion that crashed
            shutil.rmtree(stale, ignore_errors=True)
        work = step_dir / f".{UNIVERSAL}-{os.getpid()}"
        work.mkdir()
        try:
            write_universal(step_dir, work)
            shutil.rmtree(out, ignore_errors=True)  # an older partial copy, never COMPLETE
            os.rename(work, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if say is not None:
            say(f"consolidated {step_dir} for resharding in {time.perf_counter() - start:.1f} s")
    return out


def write_universal(step_dir: Path, out: Path) -> None:
    from safetensors.torch import save_file

    meta = json.loads((step_dir / "COMPLETE").read_text())
    tensors, state = consolidate(step_dir, meta)
    save_file(
        {
            f"{kind}/{name}": t.contiguous()
            for kind, named in tensors.items()
            for name, t in named.items()
        },
        str(out / "tensors.safetensors"),
    )
    torch.save(state, out / "state.pt")
    (out / "COMPLETE").write_text(json.dumps({"source": layout_of(meta), "time": time.time()}))


def consolidate(step_dir: Path, meta: dict[str, Any]) -> tuple[dict[str, dict], dict[str, Any]]:
    """({kind: {model name: full fp32 tensor}}, state) of a checkpoint on any layout."""
    tp, pp, zero = meta["tp"], meta["pp"], meta.get("zero_stage", 0)
    client = _client_state(step_dir, zero)
    cfg_model = client["config"]["model"]
    to_model = _stage_names(cfg_model) if pp > 1 else (lambda name: name)
    per_tp: list[dict[str, dict[str, torch.Tensor]]] = [{k: {} for k in KINDS} for _ in range(tp)]
    step = None
    for stage in range(pp):
        for tp_rank in range(tp):
            mp = stage * tp + tp_rank  # DeepSpeed's model-parallel rank: stages outermost
            read = {0: _zero0, 3: _zero3}.get(zero, _zero12)
            found, found_step = read(step_dir, mp)
            step = found_step if step is None else step
            for kind, named in found.items():
                for name, t in named.items():
                    # A tied weight is in every stage that uses it: the first stage's copy.
                    per_tp[tp_rank][kind].setdefault(to_model(name), t)
    dims = meta["tp_dims"]
    real = cfg_model.get("tokenizer_vocab")
    full: dict[str, dict[str, torch.Tensor]] = {}
    for kind in KINDS:
        full[kind] = {}
        for name in per_tp[0][kind]:
            parts = [per_tp[r][kind][name] for r in range(tp)]
            t = torch.cat(parts, dim=dims[name]) if name in dims and tp > 1 else parts[0]
            t = t.float()
            if real is not None and VOCAB_PARAM.search(name) and t.shape[0] > real:
                t = t[:real]  # the padding rows: masked in the model, rebuilt on load
            full[kind][name] = t.clone()
    state = {
        "optimizer_step": step,
        "lr_scheduler": client.pop("lr_scheduler"),
        "global_steps": client.pop("global_steps"),
        "global_samples": client.pop("global_samples"),
        "skipped_steps": client.pop("skipped_steps"),
        "client": client,
        "vocab_rows": real if real is not None else cfg_model.get("vocab_size"),
    }
    return full, state


CLIENT_KEYS = ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")


def _client_state(step_dir: Path, zero: int) -> dict[str, Any]:
    """Our client state (trainer, data, config) and DeepSpeed's counters and LR schedule, from
    the first model-states file."""
    name = (
        "zero_pp_rank_0_mp_rank_00_model_states.pt" if zero == 3 else "mp_rank_00_model_states.pt"
    )
    f = step_dir / name
    if not f.is_file():
        raise CheckpointError(f"checkpoint {step_dir} misses {name}; restore it from a copy")
    sd = torch.load(f, map_location="cpu", weights_only=False)
    ours = {k: sd[k] for k in ("trainer", "data", "config") if k in sd}
    return {**ours, **{k: sd.get(k) for k in CLIENT_KEYS}}


def _stage_names(cfg_model: dict[str, Any]) -> Callable[[str], str]:
    """Pipeline stage parameter names -> the one-process model's."""
    from pretrain.config import ModelConfig
    from pretrain.models.pipeline import pipeline_layer_specs, stage_name_map

    return stage_name_map(pipeline_layer_specs(ModelConfig(**cfg_model)))


def _by_dp_rank(files: list[Path]) -> list[Path]:
    return sorted(files, key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """zero_to_fp32's helpers print a line per call."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _load(f: Path) -> dict[str, Any]:
    return torch.load(f, map_location="cpu", weights_only=False)


def _zero12(step_dir: Path, mp: int) -> tuple[dict[str, dict], int]:
    """ZeRO-1/2 (and bf16's optimizer): flat fp32 partitions per parameter group and DP rank."""
    from deepspeed.utils.zero_to_fp32 import _zero2_merge_trainable_params, parse_model_states

    files = _by_dp_rank(list(step_dir.glob(f"*zero_pp_rank_*_mp_rank_{mp:02d}_optim_states.pt")))
    if not files:
        raise CheckpointError(f"checkpoint {step_dir} has no optimizer files of model rank {mp}")
    with _quiet():
        models = parse_model_states([step_dir / f"mp_rank_{mp:02d}_model_states.pt"])
    sds = [_load(f)["optimizer_state_dict"] for f in files]
    counts = sds[0]["partition_count"]
    world = max(counts) if isinstance(counts, list) else counts
    if world != len(files):
        raise CheckpointError(
            f"checkpoint {step_dir} has {len(files)} optimizer files of model rank {mp} for "
            f"{world} data-parallel ranks; restore the missing ones from a copy"
        )
    paddings = sds[0].get("param_alignment_paddings")
    n_groups = len(sds[0]["single_partition_of_fp32_groups"])
    flat = {"param": [sd["single_partition_of_fp32_groups"] for sd in sds]}
    for key in ("exp_avg", "exp_avg_sq"):
        flat[key] = [
            [sd["base_optimizer_state"]["state"][g][key] for g in range(n_groups)] for sd in sds
        ]
    out = {}
    for kind, groups in flat.items():
        named: dict[str, torch.Tensor] = {}
        with _quiet():
            _zero2_merge_trainable_params(named, world, groups, models, paddings)
        out[kind] = named
    return out, _adam_step(sds[0]["base_optimizer_state"]["state"])


def _zero3(step_dir: Path, mp: int) -> tuple[dict[str, dict], int]:
    """ZeRO-3: every rank's flat fp32 partitions of every parameter."""
    from deepspeed.utils.zero_to_fp32 import _zero3_merge_trainable_params, parse_model_states

    pattern = f"zero_pp_rank_*_mp_rank_{mp:02d}_{{}}_states.pt"
    models_f = _by_dp_rank(list(step_dir.glob(pattern.format("model"))))
    optim_f = _by_dp_rank(list(step_dir.glob("*" + pattern.format("optim"))))
    if not optim_f or len(models_f) != len(optim_f):
        raise CheckpointError(
            f"checkpoint {step_dir} holds {len(models_f)} model and {len(optim_f)} optimizer "
            f"files of model rank {mp}; restore the missing ones from a copy"
        )
    with _quiet():
        models = parse_model_states(models_f)
    sds = [_load(f)["optimizer_state_dict"] for f in optim_f]
    world = len(sds)
    n_groups = len(sds[0]["fp32_flat_groups"])
    flat = {"param": [sd["fp32_flat_groups"] for sd in sds]}
    for key in ("exp_avg", "exp_avg_sq"):
        flat[key] = [
            [sd["optimizer_state_dict"]["state"][g][key] for g in range(n_groups)] for sd in sds
        ]
    out = {}
    for kind, groups in flat.items():
        named: dict[str, Any] = {}
        with _quiet():
            _zero3_merge_trainable_params(named, world, groups, models)
        out[kind] = {k: v.contiguous() for k, v in named.items()}
    return out, _adam_step(sds[0]["optimizer_state_dict"]["state"])


def _zero0(step_dir: Path, mp: int) -> tuple[dict[str, dict], int]:
    """ZeRO-0: the module's weights and a torch AdamW state numbered in the order of
    pretrain.optim.param_groups (decayed parameters first, then the others)."""
    from pretrain.optim import decayed

    sd = _load(step_dir / f"mp_rank_{mp:02d}_model_states.pt")
    module, buffers = sd["module"], set(sd.get("buffer_names") or [])
    names = [k for k, v in module.items() if torch.is_tensor(v) and k not in buffers]
    order = [n for n in names if decayed(n, module[n].shape)]
    order += [n for n in names if not decayed(n, module[n].shape)]
    opt = sd.get("optimizer")
    indices = [i for g in (opt or {}).get("param_groups", []) for i in g["params"]]
    if opt is None or len(indices) != len(order):
        raise CheckpointError(
            f"checkpoint {step_dir}: the optimizer state of model rank {mp} does not match its "
            f"{len(order)} parameters; resume it on its own layout"
        )
    out: dict[str, dict[str, torch.Tensor]] = {"param": {n: module[n] for n in order}}
    for key in ("exp_avg", "exp_avg_sq"):
        out[key] = {order[i]: opt["state"][idx][key] for i, idx in enumerate(indices)}
        wrong = [n for n, t in out[key].items() if t.shape != module[n].shape]
        if wrong:  # another grouping than param_groups' (expert groups, say): names unknown
            raise CheckpointError(
                f"checkpoint {step_dir}: the optimizer state of model rank {mp} is not ordered "
                f"like its parameters ({wrong[0]}); resume it on its own layout"
            )
    return out, _adam_step(opt["state"])


def _adam_step(state: dict[Any, dict[str, Any]]) -> int:
    steps = {int(s["step"]) for s in state.values() if "step" in s}
    if len(steps) != 1:
        raise CheckpointError(f"the optimizer state holds step counts {sorted(steps)}, not one")
    return steps.pop()


# --- loading on the new layout (every rank) ---------------------------------------------------


def load_universal(engine: Any, layout: Any, cfg: Any, udir: Path, exclude: list[str]) -> dict:
    """Copy this rank's slices of a consolidated checkpoint into a freshly built engine.
    Returns the client state, as DeepSpeed's load_checkpoint does."""
    from safetensors import safe_open

    state = torch.load(udir / "state.pt", map_location="cpu", weights_only=False)
    module = engine.module
    names = _model_names(module)
    with_optimizer = "optimizer" not in exclude
    optimizer = _base_optimizer(engine)
    keys = _state_keys(engine, optimizer)
    if with_optimizer:
        _ensure_adam_state(keys, optimizer)
    if with_optimizer and hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 and bf16 link each parameter to its optimizer state after the first step,
        # once AdamW's lazy state exists; it exists now, so link it for the writes below.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    rows = cfg.model.vocab_size
    with safe_open(str(udir / "tensors.safetensors"), framework="pt") as f:
        stored = set(f.keys())
        for local_name, p in module.named_parameters():
            name = names.get(local_name, local_name)
            if f"param/{name}" not in stored:
                raise CheckpointError(
                    f"{udir} has no parameter {name!r}: the checkpoint holds another model"
                )
            kinds = KINDS if with_optimizer else KINDS[:1]
            local = {k: _slice(f.get_tensor(f"{k}/{name}"), name, p, layout, rows) for k in kinds}
            _set_weight(p, local["param"], engine, layout)
            if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

                safe_set_full_fp32_param(p, local["param"])
                for k in kinds[1:]:
                    safe_set_full_optimizer_state(p, local[k], k)
            elif with_optimizer:  # ZeRO-0: torch AdamW over the module's own parameters
                st = optimizer.state[p]
                for k in kinds[1:]:
                    st[k].copy_(local[k])
    if with_optimizer:
        for p in keys:
            optimizer.state[p]["step"].fill_(state["optimizer_step"])
    if "scheduler" not in exclude and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    engine.global_steps = state["global_steps"]
    engine.global_samples = state["global_samples"]
    engine.skipped_steps = state["skipped_steps"]
    return state["client"]


def _model_names(module: Any) -> dict[str, str]:
    if hasattr(module, "_layer_specs"):  # a pipeline stage
        from pretrain.models.pipeline import model_names

        return model_names(module)
    return {}


def _base_optimizer(engine: Any) -> Any:
    """The torch AdamW that holds the moments: DeepSpeed's ZeRO and bf16 optimizers wrap it
    (some of them are torch Optimizers themselves, with a `state` of their own)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


def _state_keys(engine: Any, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors AdamW keys its state by. ZeRO-3 hands its flat fp32 partitions to the
    optimizer's groups only for the duration of a step; the others keep them there."""
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flat is not None:
        return list(flat)
    return [p for group in optimizer.param_groups for p in group["params"]]


def _ensure_adam_state(keys: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """AdamW creates its state lazily at the first step; resharding writes into it before."""
    for p in keys:
        st = optimizer.state[p]
        st.setdefault("step", torch.tensor(0.0))
        for k in ("exp_avg", "exp_avg_sq"):
            st.setdefault(k, torch.zeros_like(p, memory_format=torch.preserve_format))


def _slice(full: torch.Tensor, name: str, p: Any, layout: Any, rows: int) -> torch.Tensor:
    """This TP rank's part of a full tensor, the vocabulary padded to this run's rows."""
    if VOCAB_PARAM.search(name) and full.shape[0] != rows:
        if full.shape[0] > rows:
            raise CheckpointError(
                f"{name} has {full.shape[0]} vocabulary rows in the checkpoint, more than this "
                f"run's model.vocab_size={rows}"
            )
        pad = full.new_zeros((rows - full.shape[0], *full.shape[1:]))
        full = torch.cat([full, pad])
    shape = tuple(getattr(p, "ds_shape", p.shape))
    if getattr(p, "tensor_model_parallel", False) and layout.tp_size > 1:
        dim = p.partition_dim
        size = full.shape[dim] // layout.tp_size
        full = full.narrow(dim, layout.tp_rank * size, size)
    if tuple(full.shape) != shape:
        raise CheckpointError(
            f"{name}: the checkpoint's tensor gives {tuple(full.shape)} on this rank, the model "
            f"has {shape}; the checkpoint holds another model"
        )
    return full.contiguous()


def _set_weight(p: Any, value: torch.Tensor, engine: Any, layout: Any) -> None:
    """The module's (low-precision under bf16) copy of a weight."""
    if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of the flattened TP shard
        part = p.ds_tensor
        n = part.numel()
        opt = engine.optimizer
        rank, world = opt._get_param_partition_rank(p), opt._get_param_partition_world_size(p)
        padded = value.new_zeros(n * world)
        padded[: value.numel()] = value.flatten()
        part.data.copy_(padded[n * rank : n * (rank + 1)].to(part.dtype))
        return
    p.data.copy_(value.to(p.dtype))
