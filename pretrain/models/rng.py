"""The model-parallel random generator: dropout that knows about tensor parallelism.

Two kinds of activations get dropout, and they need different streams:

- replicated activations (the residual stream and embeddings without sequence parallelism) are
  the same tensor on every rank of a tensor-parallel group, so every rank must drop the same
  elements: they draw from torch's default generator, seeded identically across the group
  (pretrain.train seeds it per data-parallel and pipeline rank only);
- sharded activations (attention probabilities of this rank's heads; the residual stream under
  sequence parallelism, where each rank holds its own slice of the sequence) are different
  tensors on each rank and need independent masks, else every head group or sequence shard
  repeats the same pattern. They draw from this module's generator, seeded per
  (seed, data-parallel rank, pipeline rank, tensor-parallel rank).

Dropout kernels (F.dropout, SDPA's dropout) take no generator argument; they draw from the
default generator of the tensor's device. So, as megatron's CUDA rng tracker does, `fork()`
swaps this generator's state in for the duration of the call and swaps it back afterwards, on
CPU and CUDA alike. The generator is an explicit object (no module-level state): a model holds
one in its `TensorParallel` context, `model_rng(module)` finds it, and checkpoints carry its
`state_dict()`.

Activation recomputation must redraw the same masks. torch.utils.checkpoint restores only the
default generators before recomputing; `checkpoint_context()` is the `context_fn` that also
rewinds this generator to where the forward pass found it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def model_parallel_seed(seed: int, dp_rank: int, pp_rank: int, tp_rank: int) -> int:
    """A 63-bit seed distinct for every (seed, dp, pp, tp): hashed rather than a sum such as
    seed + 100 * pp + tp, whose terms collide once a size exceeds the stride."""
    key = f"model-parallel-rng:{seed}:{dp_rank}:{pp_rank}:{tp_rank}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


class ModelParallelRNG:
    """A generator for dropout on tensor-parallel-sharded activations.

    It keeps one state per device kind it has been used on: the CPU generator's state, and one
    per CUDA device index, each created from the seed on first use (so a model moved to a GPU
    after seeding needs nothing more).
    """

    def __init__(self, seed: int = 0):
        self.seed(seed)

    def seed(self, seed: int) -> None:
        """Start over from `seed` on every device."""
        self._seed = int(seed)
        self._states: dict[str, torch.Tensor] = {}

    @property
    def initial_seed(self) -> int:
        return self._seed

    # --- state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self._seed, "states": {k: v.clone() for k, v in self._states.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._seed = int(state["seed"])
        self._states = {k: v.clone() for k, v in state["states"].items()}

    # --- drawing ------------------------------------------------------------------------

    @staticmethod
    def _key(device: torch.device) -> str:
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            return f"cuda:{index}"
        raise ValueError(f"the model-parallel generator supports cpu and cuda, not {device}")

    def _initial_state(self, key: str) -> torch.Tensor:
        gen = torch.Generator(device=key)
        gen.manual_seed(self._seed)
        return gen.get_state()

    @contextlib.contextmanager
    def fork(self, device: torch.device | str) -> Iterator[None]:
        """Draw from this generator inside the block: random ops on `device` tensors use its
        state, which advances; the device's default generator is left exactly as it was."""
        device = torch.device(device)
        key = self._key(device)
        if device.type == "cpu":
            get, put = torch.get_rng_state, torch.set_rng_state
        else:
            index = int(key.split(":")[1])

            def get() -> torch.Tensor:
                return torch.cuda.get_rng_state(index)

            def put(state: torch.Tensor) -> None:
                torch.cuda.set_rng_state(state, index)

        outside = get()
        put(self._states[key] if key in self._states else self._initial_state(key))
        try:
            yield
        finally:
            self._states[key] = get()
            put(outside)

    # --- recomputation ------------------------------------------------------------------

    def checkpoint_context(self) -> tuple[contextlib.AbstractContextManager, ...]:
        """A `context_fn` for torch.utils.checkpoint (use_reentrant=False): the forward context
        records this generator's state; the recompute context rewinds to it, so the recomputed
        dropout masks equal the forward's, and afterwards restores the state the rest of the
        model has reached (later layers must not see their draws repeated)."""
        saved: dict[str, Any] = {}

        @contextlib.contextmanager
        def forward() -> Iterator[None]:
            saved.update(self.state_dict())
            yield

        @contextlib.contextmanager
        def recompute() -> Iterator[None]:
            now = self.state_dict()
            self.load_state_dict(saved)
            try:
                yield
            finally:
                self.load_state_dict(now)

        return forward(), recompute()


def model_rng(module: nn.Module) -> ModelParallelRNG:
    """The model-parallel generator of a built model (a family model, a DeepSpeed engine's
    module, a pipeline stage): the one of the first submodule carrying a tensor-parallel
    context `tpc`. Every layer of a model shares its context, hence its generator."""
    for m in module.modules():
        tpc = getattr(m, "tpc", None)
        rng = getattr(tpc, "rng", None)
        if isinstance(rng, ModelParallelRNG):
            return rng
    raise LookupError(
        f"{type(module).__name__} has no submodule with a tensor-parallel context (tpc); "
        "build it from pretrain.models.layers"
    )


def seed_model_rng(module: nn.Module, seed: int, dp_rank: int, pp_rank: int, tp_rank: int):
    """Seed a model's model-parallel generator for this rank (see model_parallel_seed)."""
    rng = model_rng(module)
    rng.seed(model_parallel_seed(seed, dp_rank, pp_rank, tp_rank))
    return rng
