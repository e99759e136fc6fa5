"""Run under torchrun by test_zero.py: ZeRO-3 construction and bf16 gradient accumulation.

usage: torchrun ... tests/distributed/zero_worker.py construct OUT.json TP
       torchrun ... tests/distributed/zero_worker.py accumulate OUT.json

construct: builds a small GPT (tied embedding and head, learned positions) plain and through
  pretrain.engine.build_model_for at ZeRO-3, tracking the bytes of every materialised parameter
  as each parameter is registered, and gathers the ZeRO-3 weights to compare them bitwise with
  the plain build. Negative controls: the plain build's tracked peak; at TP=2 a zero.Init that
  partitions over the world instead of the DP group; under bf16, DeepSpeed's default zero.Init
  (constructors patched to bf16) against ours.
accumulate: for ZeRO stages 1-3 at DP=2, the full gradient of a bf16 model after 8 accumulated
  micro-batches, with the run's DeepSpeed config (fp32 accumulation and reduction) and with the
  DeepSpeed dtypes set back to bf16 (the negative control), each against the exact fp64 sum of
  the micro-batch gradients that autograd produced.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import weakref

import torch
from worker import write_records

from pretrain import distributed
from pretrain.config import Config, load_config
from pretrain.distributed import DeepSpeedMPU
from pretrain.engine import build_engine, build_model_for, deepspeed_config
from pretrain.models import build_model

MODEL = [
    "model.vocab_size=512",
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.seq_len=32",
    "model.dropout=0.0",
]


def config(*overrides: str, base: str = "tiny") -> Config:
    return load_config(f"configs/{base}.yaml", [*MODEL, *overrides])


class LiveParams:
    """Peak bytes of parameter data materialised at once on this rank while a model is built:
    checked whenever any module registers a parameter (torch's global registration hook), which
    is when a new weight appears; a partitioned ZeRO-3 parameter holds an empty tensor."""

    def __init__(self):
        self.params: list[weakref.ref] = []
        self.peak = 0

    def _hook(self, module, name, param):
        if param is None:
            return
        self.params.append(weakref.ref(param))
        self.peak = max(self.peak, self.live())

    def live(self) -> int:
        alive = [r() for r in self.params]
        return sum(p.data.numel() * p.data.element_size() for p in alive if p is not None)

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_parameter_registration_hook(
            self._hook
        )
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def plain(cfg: Config, layout) -> torch.nn.Module:
    distributed.seed_all(cfg.run.seed)
    return build_model(cfg.model, layout.tp_group, layout.tp_size, cfg.parallel.sequence_parallel)


def gathered_equal(model, reference, dtype=None) -> bool:
    """Whether every ZeRO-3 parameter, gathered, equals the reference's bitwise (collective)."""
    import deepspeed

    ref = dict(reference.named_parameters())
    same = True
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            want = ref[name].detach() if dtype is None else ref[name].detach().to(dtype)
            same &= p.shape == want.shape and torch.equal(p.data, want)
    return same


def buffers_equal(model, reference) -> bool:
    ref = dict(reference.named_buffers())
    return all(torch.equal(b, ref[n]) for n, b in model.named_buffers())


def construct(out: str, tp: int) -> None:
    cfg = config("parallel.zero_stage=3", f"parallel.tp={tp}")
    layout = distributed.setup(cfg)
    with LiveParams() as unsharded:
        ref = plain(cfg, layout)
    # The bound zero.Init can meet: one module's own parameters at a time (this rank's TP
    # shard of them), never more. Computed from the plain build, not from the code under test.
    bound = max(
        sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
        for m in ref.modules()
    )
    total = sum(p.numel() * p.element_size() for p in ref.parameters())
    distributed.seed_all(cfg.run.seed)
    with LiveParams() as sharded:
        model = build_model_for(cfg, layout)
    held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    # Each parameter split into dp equal pieces, padded up to a multiple of dp.
    shard = sum(math.ceil(p.numel() / layout.dp_size) * 4 for p in ref.parameters())
    record = {
        "rank": layout.rank,
        "dp": layout.dp_size,
        "tp": layout.tp_size,
        "total": total,
        "bound": bound,
        "unsharded_peak": unsharded.peak,
        "sharded_peak": sharded.peak,
        "sharded_live_after": sharded.live(),
        "held": held,
        "shard": shard,
        "equal": gathered_equal(model, ref),
        "buffers_equal": buffers_equal(model, ref),
    }
    del model
    # BERT's MLM transform and T5's shared relative-position table: the other families'
    # parameters that are initialised or used outside a plain layer.
    for family in ("bert", "t5"):
        fcfg = config("parallel.zero_stage=3", f"parallel.tp={tp}", base=f"tiny_{family}")
        fref = plain(fcfg, layout)
        distributed.seed_all(fcfg.run.seed)
        record[f"{family}_equal"] = gathered_equal(build_model_for(fcfg, layout), fref)
    if tp > 1:
        # Negative control: zero.Init without the DP group partitions over the whole world
        # and broadcasts rank 0's weights over the other tensor-parallel shards.
        import deepspeed

        ds = deepspeed_config(cfg, layout)
        ds["train_batch_size"] *= layout.tp_size  # without an mpu DeepSpeed counts every rank
        distributed.seed_all(cfg.run.seed)
        with deepspeed.zero.Init(config_dict_or_path=ds, tensor_overrides=[]):
            world = build_model(cfg.model, layout.tp_group, layout.tp_size)
        record["world_group_equal"] = gathered_equal(world, ref)
        del world
    # bf16 (rotary positions, whose tables DeepSpeed's constructor patching would compute in
    # bf16): ours equals the plain build cast the way the engine casts it; DeepSpeed's default
    # zero.Init (constructors patched to bf16) is the negative control.
    cfg16 = config(
        "parallel.zero_stage=3", f"parallel.tp={tp}", "run.precision=bf16", "model.positions=rope"
    )
    ref16 = plain(cfg16, layout)
    distributed.seed_all(cfg16.run.seed)
    ours = build_model_for(cfg16, layout)
    record["bf16_equal"] = gathered_equal(ours, ref16, torch.bfloat16)
    record["bf16_buffers_equal"] = buffers_equal(ours, ref16)
    del ours
    import deepspeed

    distributed.seed_all(cfg16.run.seed)
    with deepspeed.zero.Init(
        config_dict_or_path=deepspeed_config(cfg16, layout),
        data_parallel_group=layout.dp_group,
        mpu=DeepSpeedMPU(layout),
    ):
        default = build_model(cfg16.model, layout.tp_group, layout.tp_size)
    record["bf16_default_equal"] = gathered_equal(default, ref16, torch.bfloat16) and (
        buffers_equal(default, ref16)
    )
    write_records(out, record, layout)


def full_grads(engine) -> torch.Tensor:
    """Every parameter's full gradient, flattened in name order (collective at ZeRO-3)."""
    from deepspeed.utils import safe_get_full_grad

    parts = []
    for _, p in sorted(engine.module.named_parameters()):
        parts.append(safe_get_full_grad(p).detach().float().flatten())
    return torch.cat(parts)


def accumulated_grad(
    stage: int, precision: str, bf16_accumulation: bool, layout
) -> tuple[str, torch.Tensor, torch.Tensor]:
    """The gradient of one optimizer step of 8 micro-batches of 2 sequences per rank, as
    DeepSpeed hands it to the optimizer, and its exact value: the gradients autograd produced
    for each micro-batch on each rank (seen by tensor hooks, before DeepSpeed accumulates
    them), summed in fp64 and averaged over the data-parallel ranks in fp64. The difference
    is what accumulation and reduction rounded away, and nothing else (bf16 compute is in
    both)."""
    import deepspeed

    from pretrain.optim import build_scheduler, param_groups

    # The process's layout was made for another batch; DeepSpeed takes its accumulation count
    # from the layout (with 1, every micro-batch would be an optimizer step of its own).
    layout = dataclasses.replace(layout, grad_accum=8)
    cfg = config(
        f"parallel.zero_stage={stage}",
        f"run.precision={precision}",
        "parallel.micro_batch_size=2",
        f"parallel.global_batch_size={2 * 8 * layout.dp_size}",
    )
    distributed.seed_all(cfg.run.seed)
    model = build_model_for(cfg, layout)
    if bf16_accumulation:
        # Test-only: DeepSpeed's own defaults (model dtype for accumulation and reduction).
        ds = deepspeed_config(cfg, layout)
        ds["data_types"] = {"grad_accum_dtype": "bf16"}
        ds["communication_data_type"] = "bf16"
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, cfg.optim.weight_decay),
            config=ds,
            lr_scheduler=build_scheduler(cfg.optim, cfg.run.train_steps),
            mpu=DeepSpeedMPU(layout),
            dist_init_required=False,
        )
    else:
        engine, _ = build_engine(cfg, layout, model)
    exact = {name: None for name, _ in engine.module.named_parameters()}

    def keep(name: str):
        def hook(grad: torch.Tensor) -> None:
            g64 = grad.detach().double()
            exact[name] = g64 if exact[name] is None else exact[name] + g64

        return hook

    handles = [p.register_hook(keep(n)) for n, p in engine.module.named_parameters()]
    g = torch.Generator().manual_seed(100 + layout.dp_rank)
    for i in range(8):
        t = torch.randint(0, 512, (2, 33), generator=g)
        loss = engine(tokens=t[:, :-1], targets=t[:, 1:])
        engine.backward(loss)
        if i < 7:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-step
    assert engine.gradient_accumulation_steps() == 8 and engine.is_gradient_accumulation_boundary()
    grad = full_grads(engine)
    engine.step()
    for h in handles:
        h.remove()
    reference = torch.cat([exact[name].flatten() for name in sorted(exact)])
    torch.distributed.all_reduce(reference, group=layout.dp_group)
    reference /= layout.dp_size
    record = (type(engine.optimizer).__name__, grad, reference)
    engine.destroy()
    return record


BF16_STEPS = 12  # steps of the bf16-against-fp32 training check
CYCLE = torch.arange(16) * 29 + 7


def trained_losses(precision: str, layout, *overrides: str) -> dict:
    """Train the run's engine (ZeRO-1) for BF16_STEPS steps on a learnable synthetic language
    (sequences walk a fixed cycle of 16 of the 512 tokens from a random start) and measure the
    loss on one fixed held-out batch before training and after the last two steps."""
    cfg = config(
        "parallel.zero_stage=1",
        f"run.precision={precision}",
        "parallel.micro_batch_size=4",
        f"parallel.global_batch_size={4 * layout.dp_size}",
        f"run.train_steps={BF16_STEPS}",
        "optim.warmup_steps=2",
        "optim.lr=1e-2",
        "optim.min_lr=1e-2",
        *overrides,
    )
    distributed.seed_all(cfg.run.seed)
    engine, _ = build_engine(cfg, layout, build_model_for(cfg, layout))

    def batch(g: torch.Generator) -> torch.Tensor:
        start = torch.randint(0, len(CYCLE), (4, 1), generator=g)
        return CYCLE[(start + torch.arange(33)) % len(CYCLE)].to(layout.device)

    held_out = batch(torch.Generator().manual_seed(999))

    def eval_loss() -> float:
        engine.eval()
        with torch.no_grad():
            loss = engine(tokens=held_out[:, :-1], targets=held_out[:, 1:]).float().item()
        engine.train()
        return loss

    g = torch.Generator().manual_seed(200 + layout.dp_rank)
    losses = {"start": eval_loss()}
    for step in range(1, BF16_STEPS + 1):
        t = batch(g)
        engine.backward(engine(tokens=t[:, :-1], targets=t[:, 1:]))
        engine.step()
        if step >= BF16_STEPS - 1:
            losses[step] = eval_loss()
    losses["bf16"] = bool(engine.bfloat16_enabled())
    losses["param_dtype"] = str(next(engine.module.parameters()).dtype)
    engine.destroy()
    return losses


def bf16_training(layout) -> dict:
    return {"fp32": trained_losses("fp32", layout), "bf16": trained_losses("bf16", layout)}


def bf16_train(out: str, device: str) -> None:
    layout = distributed.setup(config("parallel.zero_stage=1", f"run.device={device}"))
    record = {"rank": layout.rank, "training": bf16_training(layout)}
    write_records(out, record, layout)


def accumulate(out: str) -> None:
    layout = distributed.setup(config("parallel.zero_stage=1"))
    record: dict = {"rank": layout.rank, "stages": {}}
    for stage in (1, 2, 3):
        opt32, fp32_acc, fp32_exact = accumulated_grad(stage, "bf16", False, layout)
        opt16, bf16_acc, bf16_exact = accumulated_grad(stage, "bf16", True, layout)

        def error(g: torch.Tensor, reference: torch.Tensor) -> float:
            return ((g.double() - reference).norm() / reference.norm()).item()

        record["stages"][stage] = {
            "fp32_accumulation_error": error(fp32_acc, fp32_exact),
            "bf16_accumulation_error": error(bf16_acc, bf16_exact),
            "optimizer_fp32_accumulation": opt32,
            "optimizer_bf16_accumulation": opt16,
        }
    # After the accumulation checks: trained engines leave DeepSpeed state behind (seen to
    # change the ZeRO-3 accumulation measured after them).
    record["training"] = bf16_training(layout)
    write_records(out, record, layout)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "construct":
        construct(out, int(sys.argv[3]))
    elif mode == "bf16train":
        bf16_train(out, sys.argv[3])
    else:
        accumulate(out)
