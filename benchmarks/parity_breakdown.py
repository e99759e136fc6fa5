"""Where the end-to-end parity gap lies: the same training step built up layer by layer.

Four loops of the char config's shapes (GPT, 4 layers x 128, context 64, micro batch 12,
vocabulary 384, AdamW with the run's groups, clipping at 1.0), each in its own process,
alternating, on random tokens (no loader, no evaluation):

  plain    benchmarks/plain_gpt.PlainGPT in a plain torch loop             (the reference)
  model    our GPT (pretrain.models.build_model, TP=1) in the same loop    (the model's cost)
  engine   our GPT in DeepSpeed's engine, stepped by pretrain.steps.DataParallelSteps
           (our trainer's step without the Trainer around it)           (DeepSpeed's cost)

The figure is tokens per CPU second of each loop against `plain`'s; `e2e_parity.py` gives the
last layer, the whole `pretrain-train` process.

usage: python benchmarks/parity_breakdown.py [--steps 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB, BATCH, SEQ = 384, 12, 64
LOOPS = ("plain", "model", "engine")


def run_loop(which: str, steps: int) -> float:
    """Tokens per CPU second of `steps` steps after 20 warm-up steps (in this process)."""
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from pretrain.config import load_config
    from pretrain.environment import environ_defaults, single_process_world

    torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs" / "char.yaml", [f"model.vocab_size={VOCAB}"])
    gen = torch.Generator().manual_seed(0)
    with environ_defaults(single_process_world()):
        from pretrain import distributed

        layout = distributed.setup(cfg)
        torch.manual_seed(0)
        step = _step_fn(which, cfg, layout, gen)
        for _ in range(20):
            step()
        t = time.process_time()
        for _ in range(steps):
            step()
        return steps * BATCH * SEQ / (time.process_time() - t)


def _step_fn(which: str, cfg, layout, gen):
    import torch

    def batch():
        x = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
        return x[:, :-1], x[:, 1:]

    if which == "engine":
        from pretrain.engine import build_engine, build_model_for
        from pretrain.steps import DataParallelSteps

        engine, _ = build_engine(cfg, layout, build_model_for(cfg, layout))
        runner = DataParallelSteps(engine, layout)

        def step():
            tokens, targets = batch()
            runner.train([{"tokens": tokens, "targets": targets}])

        return step

    from plain_gpt import PlainGPT

    from pretrain.models import build_model
    from pretrain.optim import param_groups

    m = cfg.model
    if which == "model":
        model = build_model(m, layout.tp_group, 1)
    else:
        model = PlainGPT(VOCAB, m.seq_len, m.n_layers, m.d_model, m.n_heads, 4 * m.d_model)
    o = cfg.optim
    opt = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps
    )

    def step():
        tokens, targets = batch()
        if which == "model":
            loss = model(tokens=tokens, targets=targets)
        else:
            loss = model(tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return step


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop", choices=LOOPS, help=argparse.SUPPRESS)  # one loop, in a child
    a = p.parse_args(argv)
    if a.loop:
        print(f"tokens per CPU second {run_loop(a.loop, a.steps):.1f}")
        return {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    got: dict[str, list[float]] = {k: [] for k in LOOPS}
    for rep in range(a.repeats):
        for which in LOOPS if rep % 2 == 0 else LOOPS[::-1]:
            cmd = [sys.executable, __file__, "--loop", which, "--steps", str(a.steps)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            got[which].append(float(out.rsplit("tokens per CPU second ", 1)[1]))
    med = {k: statistics.median(v) for k, v in got.items()}
    print(f"| loop ({a.steps} steps, {a.repeats} repeats) | tokens per CPU second | / plain |")
    print("|---|---|---|")
    for k in LOOPS:
        print(f"| {k} | {med[k]:,.0f} | {med[k] / med['plain']:.3f} |")
    return {k: med[k] / med["plain"] for k in LOOPS}


if __name__ == "__main__":
    main()
