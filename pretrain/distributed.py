"""Process groups and the parallel layout.

`setup()` is the one place that turns a validated config into running process groups: it checks
the layout against the world size *before* any group exists, picks the device and backend (gloo on
CPU, NCCL on CUDA: one code path for both), starts torch.distributed through DeepSpeed and builds
megatron-core's tensor/pipeline/data groups. Everything downstream receives the returned `Layout`
instead of reading globals. Rank order is megatron-core's default (tp-cp-ep-dp-pp):
tensor-parallel ranks are adjacent (one node, fastest links), then data parallel, and pipeline
stages outermost.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import Config, ConfigError


@dataclass
class Layout:
    """Where this process sits: ranks, sizes, device and the groups it talks in."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dp_rank: int
    dp_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    grad_accum: int
    tp_group: Any
    dp_group: Any

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _rendezvous() -> dict[str, Any]:
    """torch.distributed's rendezvous: torchrun's environment (env://) under torchrun or for a
    world of several ranks, else a world of one on loopback, given explicitly."""
    if _env_int("WORLD_SIZE", 1) > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        return {}  # torchrun's: its workers join the agent's store (env://)
    # A world of one without a launcher needs no shared store: its own, on a port it binds
    # itself (port 0). Not MASTER_PORT: inherited from a parent process it may be that parent's
    # store (seen: EADDRINUSE in the tests), and a port picked before binding can be taken.
    return {
        "init_method": "tcp://127.0.0.1:0",
        "rank": 0,
        "world_size": 1,
        "auto_mpi_discovery": False,  # DeepSpeed would look for MPI when RANK is unset
    }


def resolve_device(cfg: Config, local_rank: int) -> torch.device:
    want = cfg.run.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device", want, "no CUDA device is visible; use 'cpu' or 'auto'")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _backend(cfg: Config, device: torch.device) -> str:
    backend = cfg.parallel.backend
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("parallel.backend", backend, "NCCL needs CUDA; use 'gloo' or 'auto'")
    return backend


def _choose_accelerator(name: str) -> None:
    """DeepSpeed's accelerator, where the environment does not name one (DS_ACCELERATOR).

    DeepSpeed reads DS_ACCELERATOR only in its first get_accelerator() call (during its import)
    and keeps the choice for the process: the variable is set just around that call, then
    removed."""
    from pretrain.environment import environ_defaults

    with environ_defaults({"DS_ACCELERATOR": name}):
        from deepspeed.accelerator import get_accelerator

        get_accelerator()


def _quiet_cpu_deepspeed() -> None:
    """On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op at init (about 30 s, and a
    compiler). gloo is all we need, so mark that op unavailable before DeepSpeed probes for it;
    DeepSpeed keeps this dict for the process and documents that edits to it persist."""
    _choose_accelerator("cpu")
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}


def setup(cfg: Config) -> Layout:
    """Validate the layout, start the process groups and return this rank's Layout.

    Without a launcher (no RANK in the environment) this is a world of one; the environment
    is left as it is (DeepSpeed's engine still needs LOCAL_RANK: see pretrain.environment)."""
    world_size, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dp_size, grad_accum = cfg.parallel.layout(world_size)  # raises before any group exists
    device = resolve_device(cfg, local_rank)
    backend = _backend(cfg, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        _choose_accelerator("cuda")
    else:
        _quiet_cpu_deepspeed()

    import deepspeed
    from megatron.core import parallel_state as ps

    # Start-up's limit (reliability.startup_timeout_s) for every group; the trainer switches
    # to reliability.collective_timeout_s after the first step (pretrain.reliability).
    startup = cfg.reliability.startup_timeout_s
    deepspeed.init_distributed(
        dist_backend=backend, verbose=False, timeout=timedelta(seconds=startup), **_rendezvous()
    )
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.parallel.tp,
        pipeline_model_parallel_size=cfg.parallel.pp,
        distributed_timeout_minutes=max(1, math.ceil(startup / 60)),
    )
    return Layout(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=dp_size,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=cfg.parallel.tp,
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=cfg.parallel.pp,
        grad_accum=grad_accum,
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
    )


def teardown() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class DeepSpeedMPU:
    """The model-parallel unit DeepSpeed asks for (`deepspeed.initialize(mpu=...)`), answered
    from our Layout so DeepSpeed reduces gradients over the data-parallel group only."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def get_model_parallel_rank(self) -> int:
        return self.layout.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tp_size

    def get_model_parallel_group(self) -> Any:
        return self.layout.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.layout.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp_size

    def get_data_parallel_group(self) -> Any:
        return self.layout.dp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.layout.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.layout.pp_size


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every generator a training step can draw from, for an exact resume."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
