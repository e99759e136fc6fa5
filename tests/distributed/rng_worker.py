"""Run under torchrun (2 processes, TP=2) by test_model_parallel_rng.py: every check of the
model-parallel generator that needs more than one tensor-parallel rank, in one launch (each
process pays for importing DeepSpeed and megatron-core once).

usage: torchrun --nproc-per-node=2 rng_worker.py OUT_DIR

Rank 0 writes OUT_DIR/rng.pt holding, per section, what every rank observed:

  attention   per rank: the keep-mask [b, heads on the rank, q, k] of the attention
              probabilities, read off SDPA's output for identical inputs on both ranks
  residual    {"plain" | "sp": per rank: [keep-mask of each residual/embedding dropout call]}
  recompute   {policy: max over parameters of ||g - g_none|| / ||g_none|| on each rank} at TP=2
              with sequence parallelism and dropout; "other_masks" is the same against a run
              whose model-parallel generator starts elsewhere (the control); "block_naive" and
              "block_run_block" compare one block recomputed by torch's checkpoint alone and by
              run_block against no recompute
  resume      losses of a straight 6-step run (checkpoint at step 3), of a run resumed from
              step 3 in fresh models and engines, and of a control resumed without the
              model-parallel generator's state; weight digests; the generator states in the
              rank files
A section that raises is recorded as {"error": traceback}.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pretrain import distributed
from pretrain.config import Config, load_config
from pretrain.distributed import Layout, seed_all
from pretrain.engine import build_engine
from pretrain.models import build_model
from pretrain.models.layers import (
    AttentionMask,
    Block,
    ResidualDropout,
    TensorParallel,
    run_block,
)
from pretrain.models.rng import model_rng, seed_model_rng
from pretrain.tracking import Tracker
from pretrain.trainer import CheckpointHook, Trainer

SEED = 3
DATA_SEED = 77
TP = 2

BASE = (
    "run.device=cpu",
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=4",
    "model.seq_len=16",
    "model.vocab_size=128",
    "model.dropout=0.5",
    "parallel.tp=2",
    "parallel.micro_batch_size=2",
    "parallel.zero_stage=1",
    "optim.lr=3e-3",
    "optim.warmup_steps=2",
    f"run.seed={SEED}",
    "tracking.enabled=false",
)


def config(*overrides: str) -> Config:
    return load_config(None, [*BASE, *overrides])


def gather(obj: Any, layout: Layout) -> list[Any]:
    out: list[Any] = [None] * layout.world_size
    dist.all_gather_object(out, obj)
    return out


def tokens(seed: int, b: int, s: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def fresh_model(cfg: Config, layout: Layout, sequence_parallel: bool = False):
    """A model as pretrain.train builds and seeds it: identical weights on every rank, the
    default generator alike across the TP group, the model-parallel one per TP rank."""
    seed_all(cfg.run.seed)
    model = build_model(cfg.model, layout.tp_group, layout.tp_size, sequence_parallel)
    seed_all(cfg.run.seed + 1)  # dp rank 0, pp rank 0, as pretrain.train.run
    seed_model_rng(model, cfg.run.seed, layout.dp_rank, layout.pp_rank, layout.tp_rank)
    return model


# --- masks ----------------------------------------------------------------------------------


def attention(layout: Layout) -> list[torch.Tensor]:
    """With q = k = 0 every probability is 1/s, and with v the identity (head size >= s) the
    output row i is (1/s) * keep[i, :] / (1 - p): the mask itself, per head."""
    cfg = config("model.seq_len=8")  # head size 32 / 4 = 8 >= 8 positions
    model = fresh_model(cfg, layout)
    attn = model.blocks[0].attn.train()
    b, s, e = 2, 8, attn.head_dim
    q = torch.zeros(b, attn.heads_local, s, e)
    kv_shape = (b, attn.groups_local, s, e)
    v = torch.eye(s, e).expand(*kv_shape).contiguous()
    with torch.no_grad():
        o = attn.attend(q, torch.zeros(kv_shape), v, AttentionMask())
    return gather(o[..., :s] > 0, layout)


def residual(layout: Layout, sequence_parallel: bool) -> list[list[torch.Tensor]]:
    """Keep-masks of every residual and embedding dropout call in one training forward of the
    same batch on both ranks."""
    cfg = config()
    model = fresh_model(cfg, layout, sequence_parallel).train()
    masks: list[torch.Tensor] = []

    def record(module, args, out):
        (x,) = args
        masks.append((out != 0) | (x == 0))  # dropped: a nonzero input that came out zero

    for m in model.modules():
        if isinstance(m, ResidualDropout):
            m.register_forward_hook(record)
    batch = tokens(DATA_SEED, 2, cfg.model.seq_len + 1, cfg.model.vocab_size)
    model(batch[:, :-1], batch[:, 1:])
    return gather(masks, layout)


# --- recompute ------------------------------------------------------------------------------


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def recompute(layout: Layout) -> dict[str, list[float]]:
    """Gradients under each recompute policy against no recompute, at TP=2 with sequence
    parallelism: residual and attention dropout both draw from the model-parallel generator."""
    cfg = config("model.n_layers=4", "model.dropout=0.3")
    batch = tokens(DATA_SEED, 2, cfg.model.seq_len + 1, cfg.model.vocab_size)

    def grads(model_cfg, state=None, mp_seed=SEED) -> dict[str, torch.Tensor]:
        seed_all(cfg.run.seed)
        model = build_model(model_cfg, layout.tp_group, layout.tp_size, True).train()
        if state is not None:
            model.load_state_dict(state)
        seed_all(cfg.run.seed + 1)
        seed_model_rng(model, mp_seed, 0, 0, layout.tp_rank)
        model(batch[:, :-1], batch[:, 1:]).backward()
        return model, {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, want = grads(cfg.model)
    state = plain.state_dict()
    out: dict[str, list[float]] = {}
    for policy, interval in [("full", 1), ("full", 2), ("selective", 1), ("selective", 2)]:
        mcfg = dataclasses.replace(cfg.model, recompute=policy, recompute_interval=interval)
        _, got = grads(mcfg, state)
        out[f"{policy}-{interval}"] = gather(max(rel(got[n], g) for n, g in want.items()), layout)
    _, other = grads(cfg.model, state, mp_seed=SEED + 1)
    out["other_masks"] = gather(max(rel(other[n], g) for n, g in want.items()), layout)
    out.update(block_controls(cfg, layout))
    return out


def block_controls(cfg: Config, layout: Layout) -> dict[str, list[float]]:
    """One sequence-parallel block (its input a sequence shard): run_block's full recompute
    against torch's checkpoint alone, which rewinds only the default generator."""
    seed_all(cfg.run.seed)
    mcfg = dataclasses.replace(cfg.model, recompute="full")
    tpc = TensorParallel.build(layout.tp_group, layout.tp_size, sequence_parallel=True)
    block = Block(mcfg, tpc, n_layers=mcfg.n_layers).train()
    s = cfg.model.seq_len // layout.tp_size
    x = torch.randn(s, 2, mcfg.d_model, generator=torch.Generator().manual_seed(5))
    x.requires_grad_()
    mask = AttentionMask(causal=True)

    def grads(apply) -> list[torch.Tensor]:
        block.zero_grad(set_to_none=True)
        x.grad = None
        seed_all(11)
        tpc.rng.seed(1000 + layout.tp_rank)
        apply(x).square().sum().backward()
        return [x.grad.clone(), *(p.grad.clone() for p in block.parameters())]

    want = grads(lambda h: block(h, mask))
    got = grads(lambda h: run_block(block, 0, h, mask))
    naive = grads(lambda h: torch.utils.checkpoint.checkpoint(block, h, mask, use_reentrant=False))
    return {
        "block_run_block": gather(max(map(rel, got, want)), layout),
        "block_naive": gather(max(map(rel, naive, want)), layout),
    }


# --- resume ---------------------------------------------------------------------------------


class Batches:
    """The trainer's loader interface over deterministic batches, with a position to save."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.global_batch = cfg.parallel.micro_batch_size
        self.step = 0

    @property
    def tokens_per_sequence(self) -> int:
        return self.cfg.model.seq_len

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        m, b = self.cfg.model, self.cfg.parallel.micro_batch_size
        seq = tokens(DATA_SEED * 1000 + self.step, b, m.seq_len + 1, m.vocab_size)
        self.step += 1
        return [{"tokens": seq[:, :-1].contiguous(), "targets": seq[:, 1:].contiguous()}]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train(cfg: Config, layout: Layout, resume: Path | None = None, keep_fresh_rng=False):
    model = fresh_model(cfg, layout)
    fresh = model_rng(model).state_dict()
    engine, scheduler = build_engine(cfg, layout, model)
    hooks = [] if resume else [CheckpointHook(printer=lambda *a, **k: None)]
    trainer = Trainer(
        cfg, layout, engine, scheduler, Batches(cfg), None, Tracker(cfg, False), hooks=hooks
    )
    if resume is not None:
        trainer.load(resume)
        if keep_fresh_rng:  # the control: everything restored but the model-parallel stream
            model_rng(model).load_state_dict(fresh)
    trainer.fit()
    return [m["loss"] for m in trainer.history], digest(model)


def resume(layout: Layout, out: Path) -> dict[str, Any]:
    common = (f"run.output_dir={out / 'runs'}", "run.train_steps=6", "model.dropout=0.1")
    straight = config(*common, "run.name=straight", "checkpoint.interval=3")
    losses, final = train(straight, layout)
    ckpt = straight.checkpoint_dir / "step_00000003"
    resumed_losses, resumed_final = train(config(*common, "run.name=resumed"), layout, ckpt)
    control_losses, control_final = train(
        config(*common, "run.name=control"), layout, ckpt, keep_fresh_rng=True
    )
    rank_files = [torch.load(ckpt / f"rank_{r:05d}.pt", weights_only=False) for r in range(TP)]
    return {
        "straight": gather(losses, layout),
        "resumed": gather(resumed_losses, layout),
        "control": gather(control_losses, layout),
        "digests": {
            "straight": gather(final, layout),
            "resumed": gather(resumed_final, layout),
            "control": gather(control_final, layout),
        },
        "model_rng_states": [f.get("model_rng") for f in rank_files],
    }


def main() -> None:
    out = Path(sys.argv[1])
    layout = distributed.setup(config())
    sections = {
        "attention": lambda: attention(layout),
        "residual": lambda: {"plain": residual(layout, False), "sp": residual(layout, True)},
        "recompute": lambda: recompute(layout),
        "resume": lambda: resume(layout, out),
    }
    record: dict[str, Any] = {}
    for name, run in sections.items():
        try:
            record[name] = run()
        except Exception:  # raised alike on every rank: recorded, and the next section runs
            record[name] = {"error": traceback.format_exc()}
    if layout.is_main:
        torch.save(record, out / "rng.pt")
    distributed.teardown()


if __name__ == "__main__":
    main()
