"""Run under torchrun (2 ranks, gloo) by tests/distributed/test_moe_parallel.py: a tiny Switch
GPT trained 5 steps by DeepSpeed engines at expert parallel 1 and 2 (dp=2 both), and at ep=2
with the experts permuted across ranks (the negative control); then an exact-resume check
through the real trainer (20 steps, against 10 + save + load + 10). Writes JSON for the test.

usage: torchrun --nproc-per-node=2 tests/distributed/moe_worker.py OUT.json DATASET TMPDIR
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain import distributed
from pretrain.config import Config, ModelConfig
from pretrain.engine import build_engine, build_model_for
from pretrain.steps import add_loss_tokens

STEPS = 5
MODEL = ModelConfig(
    n_layers=2,
    d_model=32,
    n_heads=4,
    seq_len=16,
    vocab_size=128,
    dropout=0.1,
    moe_experts=4,
    moe_every=1,
    moe_capacity_factor=1.0,  # some tokens are dropped: dropping is part of what is compared
    moe_jitter=0.01,
    moe_random_token_selection=True,
)
EXPERT = re.compile(r"(\.deepspeed_experts\.)(\d+)(\.)")


def config(ep: int, zero_stage: int = 0) -> Config:
    cfg = Config(model=MODEL)
    cfg.parallel = dataclasses.replace(
        cfg.parallel, ep=ep, zero_stage=zero_stage, micro_batch_size=4
    )
    # Clipping off: under ZeRO-2 DeepSpeed's clipping norm with experts is the mean over
    # data-parallel ranks of each rank's own norm, which differs between ep=1 and ep=2
    # (docs/moe.md; ZeRO-0's exact norm is checked in test_moe_tensor_parallel.py).
    cfg.optim = dataclasses.replace(cfg.optim, lr=1e-2, warmup_steps=0, grad_clip=0.0)
    return cfg.validate()


def global_name(name: str, ep_rank: int, local: int) -> str:
    """A parameter's name in the ep=1 model: local expert j of ep rank r is global r*local+j."""
    return EXPERT.sub(lambda m: f"{m[1]}{ep_rank * local + int(m[2])}{m[3]}", name)


def batch(step: int, dp_rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    seq = torch.randint(0, MODEL.vocab_size, (4, MODEL.seq_len + 1), generator=g)
    return {"tokens": seq[:, :-1], "targets": seq[:, 1:]}


def permute_experts(model: torch.nn.Module, ep_rank: int, ep: int) -> None:
    """Negative control: each rank holds the other rank's experts (same weights overall,
    wrong place for the all-to-all's routing)."""
    from pretrain.models.moe import MoEFeedForward, expert_seed

    local = MODEL.moe_experts // ep
    layer = 0
    for m in model.modules():
        if isinstance(m, MoEFeedForward):
            for j, expert in enumerate(m.local_experts):
                with torch.random.fork_rng(devices=[]):
                    other = (ep - 1 - ep_rank) * local + j
                    torch.manual_seed(expert_seed(model.init_seed, layer, other))
                    expert.reset_parameters()
            layer += 1


def train(layout, ep: int, zero_stage: int = 0, permute: bool = False) -> dict:
    cfg = config(ep, zero_stage)
    distributed.seed_all(1234)
    model = build_model_for(cfg, layout)
    ep_rank, local = layout.dp_rank % ep, MODEL.moe_experts // ep
    if permute:
        permute_experts(model, ep_rank, ep)
    # Dropout, jitter and random token selection draw from each rank's own stream, alike
    # whatever ep is.
    distributed.seed_all(99 + layout.dp_rank)
    engine, _ = build_engine(cfg, layout, model)
    losses, grads = [], {}
    for step in range(STEPS):
        micro = [batch(step, layout.dp_rank)]
        add_loss_tokens(micro, layout)
        loss = engine(**micro[0])
        engine.backward(loss)
        if step == 0 and zero_stage == 0:
            grads = {
                global_name(n, ep_rank, local): p.grad.detach().clone()
                for n, p in engine.module.named_parameters()
            }
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / layout.dp_size)
    gathered: list = [None] * layout.world_size
    dist.all_gather_object(gathered, grads)
    merged: dict[str, list[float]] = {}
    for rank_grads in reversed(gathered):  # rank 0's copy of replicated parameters wins
        merged.update({k: v.flatten().tolist() for k, v in rank_grads.items()})
    return {"losses": losses, "grads": merged}


def generation_logits(trainer, layout, load: bool = True) -> dict:
    """Last-position logits for a fixed batch from the trained ep=2 engine (eval mode, both
    ranks given the same tokens), and from its final checkpoint loaded the way
    pretrain-generate loads it (one process, ep=1, experts from DeepSpeed's expert files);
    without `load` the checkpoint's path instead, for a process of its own to load (the
    loader's world of one cannot be made inside a TP > 1 world)."""
    from pretrain.generate_cli import load_model

    vocab = trainer.cfg.model.vocab_size
    tokens = (torch.arange(2 * 16) * 7 % vocab).view(2, 16)
    trainer.engine.eval()
    with torch.no_grad():
        trained = trainer.engine(tokens=tokens)[:, -1]
    dist.barrier()  # the final checkpoint is complete on every rank
    loaded = None
    if load and layout.is_main:
        model, _ = load_model(trainer.ckpt_dir)
        with torch.no_grad():
            loaded = model(tokens)[:, -1].tolist()
    return {"trained": trained.tolist(), "loaded": loaded, "checkpoint": str(trainer.ckpt_dir)}


def resume_runs(layout, dataset: str, tmp: Path, extra: list[str], load: bool = True) -> dict:
    """20 steps straight, and 10 (stopped as if preempted) + checkpoint + 10 resumed, through
    pretrain.train.run at ep=2 with dropout, jitter and random token selection on; per-step
    losses and a weights digest."""
    import hashlib

    from pretrain.train import prepare, run

    def launch(name: str, resume: str = "never", *more: str):
        overrides = [
            *more,
            f"data.path={dataset}",
            f"run.output_dir={tmp / 'runs'}",
            f"run.name={name}",
            "run.train_steps=20",
            "run.log_interval=5",
            "run.eval_interval=0",
            "run.eval_batches=0",
            "tracking.enabled=false",
            f"run.resume={resume}",
            "checkpoint.interval=10",
            "parallel.ep=2",
            "parallel.micro_batch_size=2",
            "model.dropout=0.1",
            "model.moe_jitter=0.01",
            "model.moe_random_token_selection=true",
            "model.moe_capacity_factor=1.0",
            *extra,
        ]
        config_file = Path(__file__).parents[2] / "configs" / "tiny_moe.yaml"
        cfg, info, resume_from = prepare([str(config_file), *overrides])
        return run(cfg, info, resume_from, layout)

    def digest(trainer) -> str:
        h = hashlib.sha256()
        for name, p in sorted(trainer.engine.module.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    out = {}
    straight = launch("straight")
    out["straight"] = {"losses": [m["loss"] for m in straight.history], "digest": digest(straight)}
    out["generation"] = generation_logits(straight, layout, load)
    first = launch("split", "never", "run.exit_after_steps=10")  # a preempted job
    resumed = launch("split", "auto")
    out["resumed"] = {
        "first": [m["loss"] for m in first.history],
        "losses": [m["loss"] for m in resumed.history],
        "digest": digest(resumed),
    }
    return out


def main() -> None:
    out, dataset, tmp, extra = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
    layout = distributed.setup(config(1))
    results = {}
    if not extra:  # overrides given: the resume check alone (for investigations)
        results = {
            "ep1": train(layout, 1),
            "ep2": train(layout, 2),
            "ep2_zero2": train(layout, 2, zero_stage=2),
            "ep2_permuted": train(layout, 2, permute=True),
        }
    # Each rank's digest: the ep=2 weights differ per rank (its own experts).
    results["resume"] = resume_runs(layout, dataset, tmp, extra)
    gathered: list = [None] * layout.world_size
    dist.all_gather_object(gathered, results["resume"])
    results["resume_per_rank"] = gathered
    if layout.is_main:
        Path(out).write_text(json.dumps(results))
    distributed.teardown()


if __name__ == "__main__":
    main()
