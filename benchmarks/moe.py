"""Mixture of experts on CPU: does the balancing loss balance, and what does a Switch GPT buy at
equal active compute?

Four models train in lockstep in this process on the same batches (one optimizer step of each
in turn, so machine noise hits all alike): the tiny Switch GPT of configs/tiny_moe.yaml (8
experts in every other block, top-1, capacity 1.25) with the balancing loss at weight 0.01
(Switch's) and at 0.1, z-loss 0.001; the same without either router loss; and the dense GPT of
the same shape, whose parameters are the Switch model's active ones less its routers.
Reported: validation loss of each after the run, tokens/s ratio against dense, and for the
Switch models the busiest expert's share of the router's choices (before capacity dropping)
over the mean share (worst MoE layer, over the last `--window` steps) and the fraction of
tokens dropped.

usage: python benchmarks/moe.py [--steps 200] [--window 20] [--data data/stdlib]
Prints Markdown rows for docs/benchmarks.md. Single process, one thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.loader import make_batches  # noqa: E402
from pretrain import distributed  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.engine import build_engine, build_model_for  # noqa: E402
from pretrain.models.flops import active_param_count, param_count  # noqa: E402
from pretrain.models.moe import moe_statistics  # noqa: E402
from pretrain.steps import add_loss_tokens  # noqa: E402


def worst(stats: dict[str, float], suffix: str) -> float:
    return max(v for k, v in stats.items() if k.endswith(suffix))


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--data", default=str(ROOT / "data" / "stdlib"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    base = load_config(
        ROOT / "configs" / "tiny_moe.yaml",
        [f"data.path={args.data}", f"run.train_steps={args.steps}", "tracking.enabled=false"],
    )
    from data_pipeline.dataset import DatasetInfo
    from pretrain.config import resolve_vocab

    base = resolve_vocab(base, DatasetInfo(args.data).vocab_size)
    m = base.model

    def switch(aux: float, z: float):
        return dataclasses.replace(
            base, model=dataclasses.replace(m, moe_aux_loss_weight=aux, moe_z_loss_weight=z)
        )

    variants = {
        "switch, balancing loss 0.01": switch(0.01, 0.001),
        "switch, balancing loss 0.1": switch(0.1, 0.001),
        "switch, no router losses": switch(0.0, 0.0),
        "dense": dataclasses.replace(base, model=dataclasses.replace(m, moe_experts=0)),
    }
    layout = distributed.setup(base)
    runs = {}
    for name, cfg in variants.items():
        distributed.seed_all(cfg.run.seed)
        model = build_model_for(cfg, layout)
        distributed.seed_all(cfg.run.seed + 1)
        engine, _ = build_engine(cfg, layout, model)
        runs[name] = {"cfg": cfg, "engine": engine, "time": 0.0, "stats": {}}
    L, mb = m.seq_len, base.parallel.micro_batch_size
    train = make_batches(base.data, "train", L, base.run.seed, mb, vocab_size=m.vocab_size)
    for step in range(1, args.steps + 1):
        micro = train.next_step()
        add_loss_tokens(micro, layout)
        for r in runs.values():
            t0 = time.perf_counter()
            loss = r["engine"](**micro[0])
            r["engine"].backward(loss)
            r["engine"].step()
            r["time"] += time.perf_counter() - t0
            if step == args.steps - args.window:
                moe_statistics(r["engine"].module)  # reset: the window starts here
        if step % 50 == 0:
            print(f"step {step}", flush=True)
    for r in runs.values():
        r["stats"] = moe_statistics(r["engine"].module)
    train.close()

    val = make_batches(
        base.data,
        "val",
        L,
        base.run.seed,
        mb,
        vocab_size=m.vocab_size,
        shuffle=False,
        num_workers=0,
    )
    batches = [val.next_step() for _ in range(args.eval_batches)]
    tokens = args.steps * mb * L
    dense_tps = tokens / runs["dense"]["time"]
    print("| model | params (active) | val loss | tokens/s vs dense | busiest / mean | dropped |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        engine = r["engine"]
        engine.eval()
        total = n = 0.0
        with torch.no_grad():
            for micro in batches:
                count = add_loss_tokens(micro, layout)
                total += engine(**micro[0]).item() * count
                n += count
        cfg, s = r["cfg"].model, r["stats"]
        ratio = f"{worst(s, '/max_load_ratio'):.2f}x" if s else "-"
        dropped = f"{worst(s, '/dropped'):.1%}" if s else "-"
        print(
            f"| {name} | {param_count(cfg) / 1e6:.3f}M ({active_param_count(cfg) / 1e6:.3f}M) | "
            f"{total / n:.4f} | {tokens / r['time'] / dense_tps:.2f} | {ratio} | {dropped} |"
        )
    print(f"dense: {dense_tps:,.0f} tokens/s; {args.steps} steps of {mb} x {L} tokens")
    distributed.teardown()


if __name__ == "__main__":
    from pretrain.environment import environ_defaults, single_process_world

    # DeepSpeed's engine reads LOCAL_RANK from the environment (torchrun's, absent here).
    with environ_defaults(single_process_world()):
        main(sys.argv[1:])
