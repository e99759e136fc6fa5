"""How one optimizer step and one evaluation batch run, per engine kind, decided in one place.

The trainer keeps one loop. A data-parallel engine (DeepSpeedEngine) runs each micro-batch as
forward, backward, step; a pipeline engine (PipelineEngine) takes all of a step's micro-batches
at once in `train_batch`/`eval_batch` and schedules them 1F1B over its stages. `runner_for`
picks the runner; both return the step's token-weighted loss, identical on every rank.

Token weighting: each micro-batch's loss is the sum of its per-token losses divided by
`loss_tokens` = (scored tokens of the whole step over all micro-batches and data-parallel ranks)
/ (micro-batches x data-parallel ranks). DeepSpeed averages over micro-batches and ranks, so the
step's loss and gradient are the sum over every scored token of the step divided by their
number: those of one batch holding all the step's sequences, however it was split, also when
micro-batches score different numbers of tokens (masked LM, span corruption, document masks).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pretrain.distributed import Layout
from pretrain.models.layers import scored_tokens


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def add_loss_tokens(micro: list[dict[str, torch.Tensor]], layout: Layout) -> float:
    """Give every micro-batch of a step its `loss_tokens` share (see the module docstring);
    returns the step's scored tokens over all data-parallel ranks. Only batches with a loss mask
    need the one all-reduce: without one every sequence scores all its targets."""
    local = sum(scored_tokens(b) for b in micro)
    if any("loss_mask" in b for b in micro) and layout.dp_size > 1:
        count = torch.tensor(float(local), dtype=torch.float64, device=layout.device)
        dist.all_reduce(count, group=layout.dp_group)
        total = float(count.item())
    else:
        total = float(local * layout.dp_size)
    share = torch.tensor(max(total, 1.0) / (layout.dp_size * len(micro)), dtype=torch.float32)
    for batch in micro:
        batch["loss_tokens"] = share
    return total


class DataParallelSteps:
    """DeepSpeedEngine: forward, backward and step per micro-batch (DeepSpeed accumulates and
    steps the optimizer at the last one)."""

    def __init__(self, engine: Any, layout: Layout):
        from pretrain.engine import runs_direct

        self.engine, self.layout = engine, layout
        self.direct = runs_direct(engine)

    def _forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The micro-batch's loss, its gradients accumulated: through DeepSpeed's wrappers, or
        where they only keep books (engine.runs_direct) as DeepSpeed's backward computes them,
        the loss divided by the accumulation steps (skipped for one: x / 1 is x)."""
        engine = self.engine
        if not self.direct:
            loss = engine(**batch)
            engine.backward(loss)
            return loss
        loss = engine.module(**batch)
        accumulation = engine.gradient_accumulation_steps()
        (loss / accumulation if accumulation > 1 else loss).backward()
        return loss

    def _mean_over_ranks(self, loss_sum: torch.Tensor, n_micro: int) -> float:
        if self.layout.dp_size > 1:  # over one rank the all-reduce is the identity
            dist.all_reduce(loss_sum, group=self.layout.dp_group)
        return loss_sum.item() / (n_micro * self.layout.dp_size)

    def train(self, micro: list[dict[str, torch.Tensor]], decide=None) -> tuple[float, float]:
        """`decide(local_loss_sum, n_micro, norm_or_None) -> (discard, mean_loss)` runs after
        the last backward and before the optimizer update (pretrain.reliability.StepGuard):
        True discards the update; mean_loss is the loss averaged over the data-parallel ranks,
        agreed in decide's collective, so the step needs no all-reduce of its own for it. The
        norm is None where DeepSpeed only computes it inside the update."""
        from pretrain.engine import grad_norm_now, records_grad_norm
        from pretrain.reliability import discarded_update

        device, engine = self.layout.device, self.engine
        loss_sum, norm, mean = torch.zeros((), device=device), None, None
        for i, batch in enumerate(micro):
            loss = self._forward_backward(to_device(batch, device))
            loss_sum += loss.detach().float()
            discard, last = False, i == len(micro) - 1
            if last and not records_grad_norm(engine):
                norm = grad_norm_now(engine)
            if last and decide is not None:
                discard, mean = decide(loss_sum, len(micro), norm)
            if discard:
                with discarded_update(engine):
                    engine.step()
            else:
                engine.step()
        if norm is None:
            norm = float(engine.get_global_grad_norm())
        if mean is None:
            mean = self._mean_over_ranks(loss_sum, len(micro))
        return mean, norm

    def eval(self, micro: list[dict[str, torch.Tensor]]) -> float:
        total = torch.zeros((), device=self.layout.device)
        for batch in micro:
            total += self.engine(**to_device(batch, self.layout.device)).float()
        return self._mean_over_ranks(total, len(micro))


class PipelineSteps:
    """PipelineEngine: the step's micro-batches as (inputs, labels) pairs through the 1F1B
    schedule; the loss comes back averaged over micro-batches and data-parallel ranks and
    broadcast to every stage."""

    def __init__(self, engine: Any, layout: Layout, family: str):
        from pretrain.models.pipeline import FAMILIES

        self.engine, self.layout, self.family = engine, layout, FAMILIES[family]

    def _pairs(self, micro: list[dict[str, torch.Tensor]]):
        return iter([self.family.split(b) for b in micro])

    def train(self, micro: list[dict[str, torch.Tensor]], decide=None) -> tuple[float, float]:
        """`decide`: as DataParallelSteps.train's, called at the schedule's optimizer step."""
        self.engine.decide_update = decide
        try:
            loss = self.engine.train_batch(self._pairs(micro))
        finally:
            self.engine.decide_update = None
        return float(loss.item()), float(self.engine.get_global_grad_norm())

    def eval(self, micro: list[dict[str, torch.Tensor]]) -> float:
        loss = self.engine.eval_batch(self._pairs(micro), num_micro_batches=len(micro))
        return float(loss.item())


def runner_for(engine: Any, layout: Layout, family: str) -> DataParallelSteps | PipelineSteps:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if isinstance(engine, PipelineEngine):
        return PipelineSteps(engine, layout, family)
    return DataParallelSteps(engine, layout)
