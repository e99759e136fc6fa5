"""Run under torchrun by test_tensor_parallel.py: trains each requested model variant for a few
steps at TP = world size, from a fixed seed, on synthetic batches that are identical on every
rank, and saves what the test compares as full (unsharded) tensors.

usage: torchrun --nproc-per-node=N tp_worker.py OUT_DIR CASE/VARIANT/SEED [...]

One launch covers many runs: the process groups (and megatron-core's global TP group, which
vocab_parallel_cross_entropy reads) are set up once, and each run builds a fresh model and
DeepSpeed engine on them. Every run goes through the real pieces: the model from pretrain.models,
pretrain.engine.build_engine (DeepSpeed, AdamW, clipping with the model-parallel unit) and
Trainer.fit. For each run rank 0 writes OUT_DIR/<run_name>.pt holding:

  init         {param name: full tensor} as built (TP shards gathered)
  grads        {param name: full tensor} after the first backward, before the optimizer step
  final        {param name: full tensor} after all steps
  losses       per-step training loss (the trainer's value, rank 0)
  rank_losses  the same for every rank
  grad_norms   per-step global gradient norm (DeepSpeed's TP-aware norm, before clipping)
  spread       {kind: {param name: max |rank r - rank 0|}} for parameters replicated across TP
  norm_rows    sequence positions each norm layer received, call by call (the residual stream:
               [b, s, d], or [s / tp, b, d] under sequence parallelism)
  seconds      wall time of the run
A run that raises is saved as {"error": traceback} instead.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tp_cases import BASE, CASES, STEPS, VARIANT_OVERRIDES, parse_spec, run_name

from pretrain import distributed
from pretrain.config import Config, load_config
from pretrain.distributed import Layout, seed_all
from pretrain.engine import build_engine
from pretrain.tracking import Tracker
from pretrain.trainer import Trainer

# Synthetic data is drawn from its own seed, independent of the model seed, so the
# different-init control trains on exactly the same batches.
DATA_SEED = 4242


# --- synthetic batches, one builder per batch contract --------------------------------------


def markov(gen: torch.Generator, b: int, n: int, vocab: int) -> torch.Tensor:
    """[b, n] ids from a fixed sparse Markov chain (each token has 4 possible successors), so
    the loss has something to learn and moves visibly in 10 steps."""
    table = torch.randint(4, vocab, (vocab, 4), generator=torch.Generator().manual_seed(7))
    seq = torch.empty(b, n, dtype=torch.long)
    seq[:, 0] = torch.randint(4, vocab, (b,), generator=gen)
    for t in range(1, n):
        pick = torch.randint(0, 4, (b,), generator=gen)
        seq[:, t] = table[seq[:, t - 1], pick]
    return seq


def lengths(gen: torch.Generator, b: int, n: int) -> torch.Tensor:
    """Real lengths per sequence, some shorter than n so padding masks matter."""
    return torch.randint(n // 2, n + 1, (b,), generator=gen)


def causal_batch(gen: torch.Generator, b: int, L: int, vocab: int) -> dict[str, torch.Tensor]:
    seq = markov(gen, b, L + 1, vocab)
    return {"tokens": seq[:, :-1].contiguous(), "targets": seq[:, 1:].contiguous()}


def mlm_batch(gen: torch.Generator, b: int, L: int, vocab: int) -> dict[str, torch.Tensor]:
    pad_id, mask_id = 0, 1
    original = markov(gen, b, L, vocab)
    real = torch.arange(L)[None, :] < lengths(gen, b, L)[:, None]
    original = original.masked_fill(~real, pad_id)
    chosen = (torch.rand(b, L, generator=gen) < 0.15) & real
    chosen[:, 0] = True  # at least one scored position per sequence
    tokens = original.masked_fill(chosen, mask_id)
    return {
        "tokens": tokens,
        "targets": original,
        "loss_mask": chosen.float(),
        "padding_mask": real,
    }


def span_batch(gen: torch.Generator, b: int, L: int, vocab: int) -> dict[str, torch.Tensor]:
    """A span-corruption-shaped batch: the decoder predicts targets, its input is the targets
    shifted right behind the pad id (T5)."""
    pad_id = 0
    Le, Ld = L, L // 2
    enc = markov(gen, b, Le, vocab)
    enc_real = torch.arange(Le)[None, :] < lengths(gen, b, Le)[:, None]
    targets = markov(gen, b, Ld, vocab)
    dec_real = torch.arange(Ld)[None, :] < lengths(gen, b, Ld)[:, None]
    targets = targets.masked_fill(~dec_real, pad_id)
    dec = torch.cat([torch.full((b, 1), pad_id), targets[:, :-1]], dim=1)
    return {
        "enc_tokens": enc.masked_fill(~enc_real, pad_id),
        "dec_tokens": dec,
        "targets": targets,
        "loss_mask": dec_real.float(),
        "enc_padding_mask": enc_real,
        "dec_padding_mask": dec_real,
    }


def causal_docs_batch(gen: torch.Generator, b: int, L: int, vocab: int) -> dict[str, torch.Tensor]:
    """A causal batch of packed documents: doc_ids [b, L] change at random boundaries."""
    batch = causal_batch(gen, b, L, vocab)
    batch["doc_ids"] = (torch.rand(b, L, generator=gen) < 0.15).long().cumsum(dim=1)
    return batch


BATCHES = {
    "causal": causal_batch,
    "causal_docs": causal_docs_batch,
    "mlm": mlm_batch,
    "span": span_batch,
}


class SyntheticBatches:
    """The loader interface the Trainer uses (next_step, global_batch), over deterministic
    synthetic batches: step i's batch depends only on (DATA_SEED, i), on every rank."""

    def __init__(self, family: str, cfg: Config):
        self.make = BATCHES[family]
        self.cfg = cfg
        self.global_batch = cfg.parallel.micro_batch_size
        self.step = 0

    @property
    def tokens_per_sequence(self) -> int:
        return self.cfg.model.seq_len  # only throughput printing reads it

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(DATA_SEED * 1000 + self.step)
        self.step += 1
        m = self.cfg.model
        return [self.make(gen, self.cfg.parallel.micro_batch_size, m.seq_len, m.vocab_size)]

    # The rest of the loader protocol (pretrain.trainer.Batches): the trainer snapshots the
    # position before each step so that a skipped or stopped step can rewind it.
    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["consumed"])


# --- the engine, tapped -------------------------------------------------------------------


class FirstGradTap:
    """The DeepSpeed engine with one addition: a copy of every gradient as it stands at the
    first `step()` call (after the first backward, before clipping and the optimizer)."""

    def __init__(self, engine: Any):
        self._engine = engine
        self.grads: dict[str, torch.Tensor] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._engine(*args, **kwargs)

    def step(self) -> None:
        if self.grads is None:
            self.grads = {
                n: p.grad.detach().clone() for n, p in self._engine.module.named_parameters()
            }
        self._engine.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class Recorder:
    """A trainer hook keeping each step's metrics."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.metrics.append(dict(metrics))

    def at_end(self, trainer: Trainer) -> None:
        pass


# --- unsharding -----------------------------------------------------------------------------


def unshard(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """The full tensor from every rank's shard, inverting megatron's split: the master tensor
    is cut into tp * stride equal chunks along `dim` and rank r holds chunks r, r + tp, ...
    (stride 1: one contiguous block per rank)."""
    tp = len(shards)
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(tp)], dim=dim)


def full_tensors(
    model: torch.nn.Module, layout: Layout, values: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """({name: full tensor}, {name: max deviation of a replica from rank 0's copy}).

    TP-sharded parameters carry megatron's attributes (tensor_model_parallel, partition_dim,
    partition_stride); all others are replicated and every rank's copy must be the same."""
    full, spread = {}, {}
    for name, p in model.named_parameters():
        local = values[name].detach().contiguous()
        gathered = [torch.empty_like(local) for _ in range(layout.tp_size)]
        dist.all_gather(gathered, local, group=layout.tp_group)
        if getattr(p, "tensor_model_parallel", False):
            full[name] = unshard(gathered, p.partition_dim, getattr(p, "partition_stride", 1))
        else:
            full[name] = gathered[0]
            spread[name] = max(float((g - gathered[0]).abs().max()) for g in gathered)
    return full, spread


# --- one run --------------------------------------------------------------------------------


def make_config(case: str, variant: str, seed: int, tp: int) -> Config:
    overrides = [
        *BASE,
        *CASES[case].overrides,
        *VARIANT_OVERRIDES[variant],
        f"parallel.tp={tp}",
        f"run.seed={seed}",
        f"run.train_steps={STEPS}",
    ]
    return load_config(None, overrides)


def make_model(cfg: Config, layout: Layout) -> torch.nn.Module:
    """The model as training builds it: the family's class plus the sequence-parallel
    gradient hooks."""
    from pretrain.models import build_model

    return build_model(cfg.model, layout.tp_group, layout.tp_size, cfg.parallel.sequence_parallel)


def watch_norm_rows(model: torch.nn.Module) -> list[int]:
    """A list that fills with the number of sequence positions every norm layer receives, call
    by call: seq_len / tp under sequence parallelism (the residual stream is sharded), seq_len
    without. It shows the sp runs really shard the sequence."""
    rows: list[int] = []
    seq_dim = 0 if model.tpc.seq_first else 1
    for m in model.modules():
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
            m.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[seq_dim]))
    return rows


def drop_dgrad_reduce(model: torch.nn.Module) -> None:
    """Negative control: no column-parallel layer all-reduces its input gradient any more."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    hit = 0
    for m in model.modules():
        if isinstance(m, ColumnParallelLinear):
            m.allreduce_dgrad, m.disable_grad_reduce = False, True
            hit += 1
    if not hit:
        raise RuntimeError("no ColumnParallelLinear to break: the control would test nothing")


def train_one(case: str, variant: str, seed: int, layout: Layout) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg = make_config(case, variant, seed, layout.tp_size)
    seed_all(cfg.run.seed)  # the same draws, in the same order, at every TP size
    model = make_model(cfg, layout).to(layout.device)
    if variant == "no_dgrad_reduce":
        drop_dgrad_reduce(model)
    norm_rows = watch_norm_rows(model)
    init, init_spread = full_tensors(model, layout, dict(model.named_parameters()))
    seed_all(cfg.run.seed + 1)  # as pretrain.train.run does before building the engine
    engine, scheduler = build_engine(cfg, layout, model)
    tap = FirstGradTap(engine)
    recorder = Recorder()
    trainer = Trainer(
        cfg,
        layout,
        tap,
        scheduler,
        SyntheticBatches(CASES[case].family, cfg),  # type: ignore[arg-type]
        None,
        Tracker(cfg, layout.is_main),
        hooks=[recorder],
    )
    trainer.fit()
    if tap.grads is None:
        raise RuntimeError("the trainer never called engine.step(): no gradients were taken")
    grads, grad_spread = full_tensors(model, layout, tap.grads)
    final, final_spread = full_tensors(model, layout, dict(model.named_parameters()))
    losses = [m["loss"] for m in recorder.metrics]
    rank_losses: list[Any] = [None] * layout.world_size
    dist.all_gather_object(rank_losses, losses)
    return {
        "case": case,
        "variant": variant,
        "seed": seed,
        "tp": layout.tp_size,
        "init": init,
        "grads": grads,
        "final": final,
        "losses": losses,
        "rank_losses": rank_losses,
        "grad_norms": [m["grad_norm"] for m in recorder.metrics],
        "grad_clip": cfg.optim.grad_clip,
        "norm_rows": norm_rows,
        "spread": {"init": init_spread, "grads": grad_spread, "final": final_spread},
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    out_dir, specs = Path(sys.argv[1]), [parse_spec(s) for s in sys.argv[2:]]
    t0 = time.perf_counter()
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    case0, variant0, seed0 = specs[0]
    layout = distributed.setup(make_config(case0, variant0, seed0, tp))
    setup_s = time.perf_counter() - t0
    for case, variant, seed in specs:
        try:
            record = train_one(case, variant, seed, layout)
        except Exception:
            # Recorded for the test to show, and the launch goes on with the other runs (an
            # error in building or running a model is raised on every rank alike).
            record = {"error": traceback.format_exc(), "seconds": 0.0}
        if layout.is_main:
            record["setup_seconds"] = setup_s
            torch.save(record, out_dir / f"{run_name(case, tp, variant, seed)}.pt")
            print(f"{run_name(case, tp, variant, seed)}: {record['seconds']:.1f} s", flush=True)
    distributed.teardown()


if __name__ == "__main__":
    main()
