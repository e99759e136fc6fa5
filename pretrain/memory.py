"""Per-rank memory accounting: what DeepSpeed holds at this ZeRO stage, and the first step's
activation peak.

Everything is measured from the live tensors, not predicted from a formula:

- params: the storages behind the model's parameters as this rank holds them (the flat bf16 or
  fp32 buffers of ZeRO-1/2, the partitions `ds_tensor` of ZeRO-3).
- grads: the gradient storages held at the gradient-accumulation boundary of the first step,
  just before the optimizer step (when they are all alive): `param.grad`, the optimizer's fp32
  gradient partitions and DeepSpeed's reduction buckets (any tensor the optimizer wrapper holds
  that is neither a parameter, a master copy nor optimizer state).
- optimizer: after the first step (Adam creates its moments lazily), the optimizer state plus
  the fp32 master copies of this rank's partition where they are separate from the parameters.
- activations: bytes saved for backward during the first step, counted once per live storage
  through `torch.autograd.graph.saved_tensors_hooks` (parameters excluded); a storage stops
  counting when the last saved tensor on it is freed. Recompute regions save only their inputs,
  so this is what recomputation saves; the transient recomputed tensors of the backward pass are
  not in it. On CUDA, `torch.cuda.max_memory_allocated` over the step is reported as well.

Use: `watch_first_step(trainer, say)` before `trainer.fit()`: it measures the first step of the
launch, prints one line on rank 0 and logs the figures to MLflow at that step.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

MiB = 2**20


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _add(seen: dict[int, int], tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        if isinstance(t, torch.Tensor) and not t.is_meta:
            ptr, n = _storage(t)
            if n:
                seen[ptr] = max(seen.get(ptr, 0), n)


def _tensors_in(obj: Any, depth: int = 4, _seen: set[int] | None = None) -> Iterable[torch.Tensor]:
    """Tensors reachable from an object's attributes and containers, a few levels deep (the
    DeepSpeed optimizer wrappers keep their buffers in lists, dicts and small helper objects)."""
    _seen = set() if _seen is None else _seen
    if id(obj) in _seen or depth < 0:
        return
    _seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if isinstance(obj, (nn.Module, torch.optim.Optimizer, str, bytes, int, float, type(None))):
        return  # modules hold the parameters (counted apart); an optimizer is walked by its owner
    if isinstance(obj, dict):
        children: Iterable[Any] = obj.values()
    elif isinstance(obj, (list, tuple, set)):
        children = obj
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("deepspeed"):
        children = vars(obj).values()
    else:
        return
    for child in children:
        yield from _tensors_in(child, depth - 1, _seen)


def param_tensors(module: nn.Module) -> list[torch.Tensor]:
    """What holds each parameter's values on this rank: its ZeRO-3 partition, or its data."""
    return [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in module.parameters()]


def _optimizer_parts(engine: Any) -> tuple[dict[int, int], dict[int, int]]:
    """(master copies, optimizer state) of the torch optimizer inside the engine."""
    basic = getattr(engine, "basic_optimizer", None) or engine.optimizer
    params: dict[int, int] = {}
    _add(params, param_tensors(engine.module))
    masters: dict[int, int] = {}
    _add(masters, (p for g in basic.param_groups for p in g["params"]))
    # ZeRO-3 puts its fp32 partitions into the param groups only while it steps; the state
    # stays keyed by them.
    _add(masters, (p for p in basic.state if isinstance(p, torch.Tensor)))
    masters = {k: v for k, v in masters.items() if k not in params}
    state: dict[int, int] = {}
    _add(
        state, (v for s in basic.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    )
    return masters, state


def grad_candidates(engine: Any) -> dict[int, int]:
    """{storage: bytes} of what may hold gradients right now: the gradients themselves and every
    tensor the optimizer wrapper holds. `engine_bytes` later removes the parameters, master
    copies and optimizer state among them (ZeRO-3 creates its Adam state, which tells its master
    copies apart, only at the first step)."""
    held: dict[int, int] = {}
    _add(held, (p.grad for p in engine.module.parameters() if p.grad is not None))
    basic = getattr(engine, "basic_optimizer", None) or engine.optimizer
    _add(held, (p.grad for g in basic.param_groups for p in g["params"] if p.grad is not None))
    _add(held, _tensors_in(engine.optimizer))
    return held


def engine_bytes(engine: Any, grads: dict[int, int] | None = None) -> dict[str, int]:
    """{"params", "grads", "optimizer"} bytes this rank holds (call after an optimizer step);
    grads from `grad_candidates` taken at an accumulation boundary (0 without)."""
    params: dict[int, int] = {}
    _add(params, param_tensors(engine.module))
    masters, state = _optimizer_parts(engine)
    others = params.keys() | masters.keys() | state.keys()
    return {
        "params": sum(params.values()),
        "grads": sum(n for k, n in (grads or {}).items() if k not in others),
        "optimizer": sum(masters.values()) + sum(state.values()),
    }


class ActivationMeter:
    """Peak bytes of tensors saved for backward, each live storage counted once."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.live: dict[int, list[int]] = {}  # storage pointer -> [nbytes, live saved tensors]
        self.current = 0
        self.peak = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _param_storages(self) -> set[int]:
        # At pack time: under ZeRO-3 a gathered weight's storage is fresh for each fetch.
        return {p.untyped_storage().data_ptr() for p in self.module.parameters()}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr, n = _storage(t)
        if n == 0 or t.is_meta or ptr in self._param_storages():
            return t
        entry = self.live.get(ptr)
        if entry is None:
            entry = self.live[ptr] = [n, 0]
            self.current += n
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)
        return t

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def __enter__(self) -> ActivationMeter:
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def process_peaks(device: torch.device) -> list[float]:
    """This process's peak resident set and (on a GPU) peak CUDA allocation, in MiB."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    cuda = torch.cuda.max_memory_allocated(device) / MiB if device.type == "cuda" else 0.0
    return [rss, cuda]


def peaks_over_ranks(layout: Any) -> dict[str, float]:
    """Peak memory of every rank, gathered (a collective: every rank calls it at the same
    step): the largest and smallest peak resident set and the rank holding the largest, and
    the same for CUDA allocations on a GPU. The busiest rank is the one that runs out first,
    and with pipeline stages or ZeRO partitions the ranks differ."""
    import torch.distributed as dist

    mine = torch.tensor(process_peaks(layout.device), dtype=torch.float64, device=layout.device)
    if layout.world_size > 1:
        parts = [torch.empty_like(mine) for _ in range(layout.world_size)]
        dist.all_gather(parts, mine)
        table = torch.stack(parts).cpu()
    else:
        table = mine.cpu().unsqueeze(0)
    out: dict[str, float] = {}
    kinds = ["rss"] + (["cuda"] if layout.device.type == "cuda" else [])
    for col, kind in enumerate(kinds):
        peak = table[:, col]
        out[f"memory_{kind}_peak_mib_max"] = float(peak.max())
        out[f"memory_{kind}_peak_mib_min"] = float(peak.min())
        out[f"memory_{kind}_peak_rank"] = float(int(peak.argmax()))
    return out


def peaks_text(figures: dict[str, float]) -> str:
    """'peak RSS 812 MiB (rank 3; min 790)', and the CUDA figure where there is one."""
    parts = []
    for kind, name in (("rss", "RSS"), ("cuda", "CUDA")):
        if f"memory_{kind}_peak_mib_max" in figures:
            parts.append(
                f"peak {name} {figures[f'memory_{kind}_peak_mib_max']:,.0f} MiB (rank "
                f"{int(figures[f'memory_{kind}_peak_rank'])}; min "
                f"{figures[f'memory_{kind}_peak_mib_min']:,.0f})"
            )
    return ", ".join(parts)


def format_line(figures: dict[str, float]) -> str:
    line = (
        f"memory per rank: params {figures['memory_params_mib']:.1f} MiB, "
        f"grads {figures['memory_grads_mib']:.1f}, optimizer {figures['memory_optimizer_mib']:.1f}"
        f"; activations peak {figures['memory_activations_peak_mib']:.1f} (step "
        f"{int(figures['step'])})"
    )
    if "memory_cuda_peak_mib" in figures:
        line += f"; CUDA max allocated {figures['memory_cuda_peak_mib']:.1f}"
    return line


class FirstStepMemory:
    """Measures one training step of a DeepSpeed engine: enter before it, `finish()` after.

    The engine's `step` is wrapped on this instance for the step's duration to read the
    gradients at the accumulation boundary, before the optimizer consumes them."""

    def __init__(self, engine: Any, device: torch.device):
        self.engine, self.device = engine, device
        self.grads: dict[int, int] = {}
        self.meter = ActivationMeter(engine.module)
        self._step = None

    def _read_grads(self, engine: Any) -> None:
        self.grads.update(grad_candidates(engine))

    def start(self) -> None:
        engine = self.engine
        if hasattr(engine, "before_optimizer_step"):
            # Our pipeline engine runs the whole step inside train_batch; it calls these once
            # the step's gradients are complete (pretrain.engine.pipeline_engine).
            engine.before_optimizer_step.append(self._read_grads)
        else:
            real_step = engine.step

            def step(*args: Any, **kwargs: Any):
                if engine.is_gradient_accumulation_boundary():
                    self._read_grads(engine)
                return real_step(*args, **kwargs)

            self._step = real_step
            engine.step = step
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.meter.__enter__()

    def unhook(self) -> None:
        self.meter.__exit__(None, None, None)
        if self._step is not None:
            del self.engine.step  # the class's method again
            self._step = None
        elif self._read_grads in getattr(self.engine, "before_optimizer_step", []):
            self.engine.before_optimizer_step.remove(self._read_grads)

    def finish(self, step: int) -> dict[str, float]:
        self.unhook()
        held = engine_bytes(self.engine, self.grads)
        figures = {
            "memory_params_mib": held["params"] / MiB,
            "memory_grads_mib": held["grads"] / MiB,
            "memory_optimizer_mib": held["optimizer"] / MiB,
            "memory_activations_peak_mib": self.meter.peak / MiB,
            "step": float(step),
        }
        if self.device.type == "cuda":
            figures["memory_cuda_peak_mib"] = torch.cuda.max_memory_allocated(self.device) / MiB
        return figures


class MemoryHook:
    """The Trainer hook that ends the measurement after the first step and reports it."""

    def __init__(self, probe: FirstStepMemory, printer: Callable[..., None] = print):
        self.probe, self.print = probe, printer
        self.figures: dict[str, float] | None = None

    def after_step(self, trainer: Any, metrics: dict[str, float]) -> None:
        if self.figures is not None:
            return
        self.figures = self.probe.finish(trainer.state.step)
        if trainer.layout.is_main:
            self.print(format_line(self.figures))
        step = int(self.figures["step"])
        trainer.tracker.log({k: v for k, v in self.figures.items() if k != "step"}, step)

    def at_end(self, trainer: Any) -> None:
        if self.figures is None:  # no step ran (a resume of a finished run): just unhook
            self.probe.unhook()


def watch_first_step(trainer: Any, printer: Callable[..., None] = print) -> MemoryHook:
    """Measure the next training step: call after `trainer.hooks` is set, right before
    `trainer.fit()`. The hook goes first, so the figures are taken before other hooks run."""
    probe = FirstStepMemory(trainer.engine, trainer.layout.device)
    hook = MemoryHook(probe, printer)
    trainer.hooks.insert(0, hook)
    probe.start()
    return hook
