"""Our GPT against the plain one, forward and backward, in one process, step by step.

The char config's shapes (4 layers x 128, 4 heads, context 64, micro batch 12, vocabulary
384): benchmarks/plain_gpt.PlainGPT and our GPT (pretrain.models.build_model at TP=1) each run
forward + backward on the same fixed batch, alternating every call (the order flipped every
round), `--calls` times; the figure is the median CPU time of each (wall time with --threads > 1)
and their ratio. Run with
`--profile` it also prints the operators whose time differs most (torch.profiler, self CPU
time per call, alternating blocks of 10 calls), which is how the costs removed in
docs/performance.md were found.

Sharing one process cancels the machine's drift between runs, but each model then runs with
the other's data in the caches: the ratio comes out closer to 1 than between two processes of
their own (benchmarks/e2e_parity.py, pairs at the same time, is the figure that counts).

usage: python benchmarks/model_ab.py [--calls 300] [--profile] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB, BATCH, SEQ = 384, 12, 64


def build():
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from plain_gpt import PlainGPT

    from pretrain import distributed
    from pretrain.config import load_config
    from pretrain.environment import environ_defaults, single_process_world
    from pretrain.models import build_model

    cfg = load_config(ROOT / "configs" / "char.yaml", [f"model.vocab_size={VOCAB}"])
    with environ_defaults(single_process_world()):
        layout = distributed.setup(cfg)
    m = cfg.model
    torch.manual_seed(0)
    ours = build_model(m, layout.tp_group, 1)
    plain = PlainGPT(VOCAB, m.seq_len, m.n_layers, m.d_model, m.n_heads, 4 * m.d_model)
    x = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    tokens, targets = x[:, :-1], x[:, 1:]

    def step(model, loss_fn):
        def run():
            loss_fn().backward()
            for p in model.parameters():
                p.grad = None

        return run

    return {
        "plain": step(plain, lambda: plain(tokens, targets)),
        "ours": step(ours, lambda: ours(tokens=tokens, targets=targets)),
    }


def time_calls(steps, calls: int, clock=time.process_time) -> dict[str, list[float]]:
    names = list(steps)
    for _ in range(10):
        for n in names:
            steps[n]()
    got: dict[str, list[float]] = {n: [] for n in names}
    for i in range(calls):
        for n in names if i % 2 == 0 else names[::-1]:
            t0 = clock()
            steps[n]()
            got[n].append(clock() - t0)
    return got


def profile_diff(steps, rounds: int = 12, block: int = 10, top: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile

    per: dict[str, dict[str, list[float]]] = {n: defaultdict(lambda: [0, 0.0]) for n in steps}
    for _ in range(rounds):
        for n, run in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(block):
                    run()
            for e in prof.key_averages():
                per[n][e.key][0] += e.count
                per[n][e.key][1] += e.self_cpu_time_total
    calls = rounds * block
    keys = set(per["plain"]) | set(per["ours"])
    diff = sorted(keys, key=lambda k: -abs(per["ours"][k][1] - per["plain"][k][1]))[:top]
    print("| operator | plain calls, ms per step | ours calls, ms per step | ours - plain ms |")
    print("|---|---|---|---|")
    for k in diff:
        p, o = per["plain"][k], per["ours"][k]
        print(
            f"| {k[:60]} | {p[0] / calls:.0f}, {p[1] / calls / 1e3:.3f} | "
            f"{o[0] / calls:.0f}, {o[1] / calls / 1e3:.3f} | {(o[1] - p[1]) / calls / 1e3:+.3f} |"
        )


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    steps = build()
    # With more threads, CPU time counts the OpenMP workers spinning at each barrier: wall time.
    got = time_calls(steps, a.calls, time.process_time if a.threads == 1 else time.perf_counter)
    med = {n: statistics.median(v) for n, v in got.items()}
    ratio = med["plain"] / med["ours"]
    print(
        f"forward+backward, median of {a.calls}: plain {med['plain'] * 1e3:.2f} ms, ours "
        f"{med['ours'] * 1e3:.2f} ms; ours runs at {ratio:.3f}x the plain model's speed"
    )
    if a.profile:
        profile_diff(steps)
    return ratio


if __name__ == "__main__":
    main()
