"""Run under torchrun by tests/distributed/test_reliability.py: several short training runs in
one process group (each launch pays seconds of imports), each through the real entry-point
code, with faults injected by `reliability.inject`. Writes, per run and rank, the losses, the
step each history entry ended at, and digests of the weights and optimizer state after every
step.

usage: torchrun ... reliability_worker.py OUT.json SCENARIOS.json
SCENARIOS.json: [{"name": ..., "overrides": [...]}, ...], all sharing one config file.
"""

import hashlib
import json
import sys

import torch
import torch.distributed as dist

from pretrain import distributed
from pretrain import trainer as T
from pretrain.train import prepare, run


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def optimizer_tensors(engine):
    opt = engine.optimizer
    for state in opt.state.values():
        for key in sorted(state):
            if torch.is_tensor(state[key]):
                yield state[key]


def main() -> None:
    out, scenarios = sys.argv[1], json.loads(open(sys.argv[2]).read())
    trace: list[dict] = []
    original = T.Trainer.train_step

    def traced(self):
        metrics = original(self)
        params = [p for _, p in sorted(self.engine.module.named_parameters())]
        trace.append(
            {
                "step": self.state.step,
                "weights": digest(params),
                "optim": digest(optimizer_tensors(self.engine)),
                "lr": self.scheduler.get_last_lr()[0],
            }
        )
        return metrics

    T.Trainer.train_step = traced
    layout = None
    records = {}
    for sc in scenarios:
        cfg, info, resume_from = prepare(sc["overrides"])
        if layout is None:
            layout = distributed.setup(cfg)
        trace.clear()
        trainer = run(cfg, info, resume_from, layout)
        records[sc["name"]] = {
            "losses": [m["loss"] for m in trainer.history],
            "skipped": [m.get("skipped", 0.0) for m in trainer.history],
            "trace": list(trace),
            "step": trainer.state.step,
            "fault": trainer.fault,
            "stop_reason": trainer.stop_reason,
            "start_digest": None,
        }
    gathered = [None] * layout.world_size
    dist.all_gather_object(gathered, records)
    if layout.is_main:
        with open(out, "w") as f:
            json.dump(gathered, f)
    distributed.teardown()


if __name__ == "__main__":
    main()
