"""The TP=1 kernel choice: megatron-core's linear and cross-entropy against F.linear and
F.cross_entropy, forward + backward, in one process, alternating.

Shapes are the char-level config's (configs/char.yaml): activations [64, 12, 128], a
128 -> 512 linear layer with bias, logits [64, 12, 384]. The figure per pair is the median over
`--rounds` rounds of the CPU time per call (CPU time: other jobs on shared cores stretch it far
less than wall time); the ratio torch / megatron is what pretrain.models.layers' TP=1 path saves.

usage: python benchmarks/tp1_kernels.py [--rounds 7] [--calls 200]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.models.layers import TensorParallel, column_linear, normal_init  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=200)
    a = p.parse_args(argv)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel as tp

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    ps.initialize_model_parallel(1)
    tpc = TensorParallel.build(ps.get_tensor_model_parallel_group())
    torch.manual_seed(0)
    layer = column_linear(128, 512, True, normal_init(0.02), tpc)
    x = torch.randn(64, 12, 128, requires_grad=True)
    logits = torch.randn(64, 12, 384, requires_grad=True)
    targets_SB = torch.randint(0, 384, (64, 12))

    def linear_megatron():
        layer(x)[0].sum().backward()

    def linear_torch():
        F.linear(x, layer.weight, layer.bias).sum().backward()

    def ce_megatron():
        # megatron subtracts the max in place: give it a fresh tensor, as lm_loss's .float() of
        # bf16 logits would; the clone is timed on both sides.
        tp.vocab_parallel_cross_entropy(logits.clone(), targets_SB).sum().backward()

    def ce_torch():
        F.cross_entropy(
            logits.clone().flatten(0, 1), targets_SB.flatten(), reduction="none"
        ).sum().backward()

    fns = [linear_megatron, linear_torch, ce_megatron, ce_torch]
    got: dict[str, list[float]] = {f.__name__: [] for f in fns}
    for f in fns:  # warm-up
        f()
    for _ in range(a.rounds):
        for f in fns:
            t0 = time.process_time()
            for _ in range(a.calls):
                f()
            got[f.__name__].append((time.process_time() - t0) / a.calls * 1e6)
    med = {k: statistics.median(v) for k, v in got.items()}
    print("| kernel (forward + backward) | megatron-core µs | torch µs | torch / megatron |")
    print("|---|---|---|---|")
    for name, label in (("linear", "linear 128 -> 512, [64, 12] tokens"),
                        ("ce", "cross-entropy, [64, 12] x 384 logits")):  # fmt: skip
        m, t = med[f"{name}_megatron"], med[f"{name}_torch"]
        print(f"| {label} | {m:,.0f} | {t:,.0f} | {t / m:.2f} |")
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return med


if __name__ == "__main__":
    main()
