"""Run under torchrun by the distributed tests: trains through the real entry-point code, then
writes what the tests compare (per-step losses, a checksum of every rank's weights) to JSON.

usage: torchrun ... tests/distributed/worker.py OUT.json CONFIG [overrides...]
"""

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist

from pretrain import distributed
from pretrain.errors import CheckpointError
from pretrain.train import prepare, run


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def record_first_update(out: str) -> None:
    """Save what the optimizer did to the weights in this launch's first step (rank 0, to
    OUT.update.pt): the weights after it minus the weights before, every parameter flattened
    in name order. Observed on the weights, not on the scheduler's bookkeeping."""
    from pretrain.trainer import Trainer

    step = Trainer.train_step

    def flat(trainer) -> torch.Tensor:
        params = sorted(trainer.engine.module.named_parameters())
        return torch.cat([p.detach().float().flatten().clone() for _, p in params])

    recorded = []

    def first(trainer):
        # Once per launch: the perf hook wraps the bound method at start-up and keeps calling
        # this wrapper, so restoring the class attribute alone would record every step.
        if recorded:
            return step(trainer)
        recorded.append(True)
        before = flat(trainer)
        metrics = step(trainer)
        if trainer.layout.is_main:
            torch.save(flat(trainer) - before, f"{out}.update.pt")
        Trainer.train_step = step
        return metrics

    Trainer.train_step = first


def record_local_loss_sums() -> list:
    """Every step's (local loss sum, micro-batches) as this rank hands them to the step's one
    collective (StepGuard.agree), before any averaging over the ranks."""
    from pretrain.reliability import StepGuard

    agree, seen = StepGuard.agree, []

    def recorded(self, step, stop_wanted, loss_sum, n_micro, norm):
        seen.append((float(loss_sum.item()), n_micro))
        return agree(self, step, stop_wanted, loss_sum, n_micro, norm)

    StepGuard.agree = recorded
    return seen


def drop_first_micro_batch_gradient() -> None:
    """Fault for negative controls (DROP_MICRO_BATCH_GRADIENT=1): rank 0's first micro-batch
    contributes no gradient (its loss is still reported), as a broken accumulation would."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    backward = DeepSpeedEngine.backward

    def dropped(self, loss, *args, **kwargs):
        DeepSpeedEngine.backward = backward
        if dist.get_rank() == 0:
            loss = loss * 0.0
        return backward(self, loss, *args, **kwargs)

    DeepSpeedEngine.backward = dropped


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    cfg, info, resume_from = prepare(argv)
    layout = distributed.setup(cfg)
    record_first_update(out)
    local_sums = record_local_loss_sums()
    if os.environ.get("DROP_MICRO_BATCH_GRADIENT") == "1":
        drop_first_micro_batch_gradient()
    # EXTRA_MEMORY=R:MiB: rank R holds that much more resident memory for the whole run, so a
    # per-rank memory report must name it (numbers of the run are untouched).
    rank_mib = os.environ.get("EXTRA_MEMORY")
    ballast = None
    if rank_mib and int(rank_mib.split(":")[0]) == int(os.environ.get("RANK", 0)):
        ballast = bytearray(int(rank_mib.split(":")[1]) * 2**20)
        ballast[::4096] = b"\1" * len(ballast[::4096])  # touch every page: resident
    try:
        trainer = run(cfg, info, resume_from, layout)
    except CheckpointError as e:  # as pretrain.train.main reports it: one line, exit status 2
        if layout.is_main:
            print(f"error: {e}", file=sys.stderr)
        distributed.teardown()
        sys.exit(2)
    record = {
        "rank": layout.rank,
        "losses": [m["loss"] for m in trainer.history],
        "lrs": [m["lr"] for m in trainer.history],
        "step": trainer.state.step,
        "consumed": trainer.train_data.consumed,
        "digest": weights_digest(trainer.engine.module),
        "bf16": bool(trainer.engine.bfloat16_enabled()),
        "grad_accum": layout.grad_accum,
        "zero_stage": trainer.engine.zero_optimization_stage(),
        "grad_norms": [m["grad_norm"] for m in trainer.history],
        "local_loss_sums": local_sums,
    }
    del ballast
    write_records(out, record, layout)


def write_records(out: str, record: dict, layout) -> None:
    """Every rank's record, gathered into one JSON list on rank 0; then the groups end."""
    gathered = [None] * layout.world_size
    dist.all_gather_object(gathered, record)
    if layout.is_main:
        with open(out, "w") as f:
            json.dump(gathered, f)
    distributed.teardown()


if __name__ == "__main__":
    main()
