"""Run under torchrun by test_reshard.py: trains through the real entry point and dumps, at one
moment of the run, every parameter's fp32 value and Adam moments as this rank holds them.

usage: torchrun ... tests/distributed/reshard_worker.py OUT.json DUMP_DIR WHEN CONFIG [overrides...]

WHEN is `save:STEP` (right after the checkpoint of STEP is written) or `load` (right after the
checkpoint is loaded, before the first step). The dump reads the engine through DeepSpeed's own
accessors (safe_get_full_fp32_param / safe_get_full_optimizer_state, or the torch optimizer's
state at ZeRO-0), not through pretrain.reshard, so the test compares what each layout really
holds. Each rank writes its tensor-parallel shard with the dimension it is split along;
the test joins the shards itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from worker import write_records

from pretrain import distributed
from pretrain import trainer as T
from pretrain.train import prepare, run


def dump(trainer: T.Trainer, out: Path) -> None:
    engine, layout = trainer.engine, trainer.layout
    module = engine.module
    names = {}
    if hasattr(module, "_layer_specs"):
        from pretrain.models.pipeline import model_names

        names = model_names(module)
    opt = engine.optimizer
    # AdamW's lazy state, the same on every rank: all of them read the moments, or none does
    # (the reads are collectives).
    has_state = len(getattr(opt, "optimizer", opt).state) > 0
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # Link each parameter to its slice of the optimizer state (DeepSpeed links it after a
        # step; saving a checkpoint relinks the parameters without it).
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    tensors = {}
    for local, p in module.named_parameters():
        zero = hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")
        if zero:  # collectives over the data-parallel group: every rank calls them in order
            value = safe_get_full_fp32_param(p)
            moments = [None, None]  # no optimizer state yet (it was not loaded)
            if has_state:
                moments = [safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")]
        else:
            state = opt.state[p]
            value, moments = p.data, [state.get("exp_avg"), state.get("exp_avg_sq")]
        dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        tensors[names.get(local, local)] = {
            "param": value.detach().float().clone(),
            "exp_avg": None if moments[0] is None else moments[0].float().clone(),
            "exp_avg_sq": None if moments[1] is None else moments[1].float().clone(),
            "dim": dim,
        }
    torch.save(
        {
            "tp_rank": layout.tp_rank,
            "tp": layout.tp_size,
            "dp_rank": layout.dp_rank,
            "tensors": tensors,
            "step": trainer.state.step,
            "consumed": trainer.train_data.consumed,
        },
        out / f"rank{layout.rank}.pt",
    )


def main() -> None:
    out, dump_dir, when, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
    dump_dir.mkdir(parents=True, exist_ok=True)
    if when.startswith("save:"):
        at = int(when.split(":")[1])
        save = T.Trainer.save

        def save_and_dump(self):
            path = save(self)
            if self.state.step == at:
                dump(self, dump_dir)
            return path

        T.Trainer.save = save_and_dump
    else:
        load = T.Trainer.load

        def load_and_dump(self, path):
            load(self, path)
            dump(self, dump_dir)

        T.Trainer.load = load_and_dump
    cfg, info, resume_from = prepare(argv)
    layout = distributed.setup(cfg)
    trainer = run(cfg, info, resume_from, layout)
    record = {
        "rank": layout.rank,
        "losses": [m["loss"] for m in trainer.history],
        "step": trainer.state.step,
        "consumed": trainer.train_data.consumed,
        "resharded": trainer.resharded,
    }
    write_records(out, record, layout)


if __name__ == "__main__":
    main()
