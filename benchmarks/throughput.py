"""Training throughput of our stack against a plain-PyTorch GPT of the same shape, same run.

Ours: GPT on megatron-core layers inside a DeepSpeed engine (ZeRO as configured), fed by our
webdataset loader. Reference: the same architecture written with torch.nn.Linear and SDPA,
trained by torch.optim.AdamW on random tokens, the loop nanoGPT uses. Both run in this process,
alternating, so machine noise hits both; the ratio ours/reference is the number to read.

usage: python benchmarks/throughput.py [CONFIG] [overrides...]   (default configs/demo.yaml)
Prints a Markdown table row for docs/benchmarks.md. Single process; one thread unless
OMP_NUM_THREADS says otherwise.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.loader import DatasetInfo, make_batches  # noqa: E402
from pretrain import distributed  # noqa: E402
from pretrain.config import load_config, resolve_vocab  # noqa: E402
from pretrain.engine import build_engine  # noqa: E402
from pretrain.models import build_model  # noqa: E402
from pretrain.models.flops import flops_per_token, param_count  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from plain_gpt import PlainGPT  # noqa: E402  (the reference model of every parity benchmark)


def time_steps(step, n: int) -> list[float]:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        step()
        sync()  # device work is asynchronous: wait for it before reading the clock
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str]) -> None:
    config = argv[0] if argv else str(ROOT / "configs/demo.yaml")
    cfg = load_config(config, argv[1:])
    info = DatasetInfo(cfg.data.path)
    cfg = resolve_vocab(cfg, info.vocab_size)
    layout = distributed.setup(cfg)
    torch.manual_seed(0)
    engine, _ = build_engine(cfg, layout, build_model(cfg.model, layout.tp_group, layout.tp_size))
    mb, L = cfg.parallel.micro_batch_size, cfg.model.seq_len
    device = layout.device
    data = make_batches(cfg.data, "train", L, 0, mb, vocab_size=cfg.model.vocab_size)

    def ours():
        (batch,) = data.next_step()
        engine.backward(engine(**{k: v.to(device) for k, v in batch.items()}))
        engine.step()

    m = cfg.model
    ref = PlainGPT(m.vocab_size, m.seq_len, m.n_layers, m.d_model, m.n_heads, m.ffn_size)
    ref = ref.to(device)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)

    def reference():
        x = torch.randint(0, cfg.model.vocab_size, (mb, L), generator=gen).to(device)
        loss = ref(x, torch.roll(x, -1, 1))
        loss.backward()
        nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for fn in (ours, reference):  # warm-up: allocator, kernels, first-step state creation
        time_steps(fn, 3)
    rounds, per_round = 5, 10
    t_ours, t_ref = [], []
    for _ in range(rounds):  # alternate so drift in machine load hits both
        t_ours += time_steps(ours, per_round)
        t_ref += time_steps(reference, per_round)
    tokens = mb * L
    ours_tps = tokens / statistics.median(t_ours)
    ref_tps = tokens / statistics.median(t_ref)
    fpt = flops_per_token(cfg.model)
    threads = torch.get_num_threads()
    print(
        f"model {param_count(cfg.model) / 1e6:.2f}M params, {fpt / 1e6:.1f} MFLOP/token, "
        f"micro batch {mb} x {L}, {threads} thread(s), {platform.processor() or 'cpu'}"
    )
    print(f"ours      {ours_tps:10,.0f} tokens/s  {ours_tps * fpt / 1e9:6.2f} GFLOP/s")
    print(f"reference {ref_tps:10,.0f} tokens/s  {ref_tps * fpt / 1e9:6.2f} GFLOP/s")
    print(f"ratio ours/reference: {ours_tps / ref_tps:.2f}")
    print(
        f"| {time.strftime('%Y-%m-%d')} | {Path(config).name} | {threads} | "
        f"{ours_tps:,.0f} | {ref_tps:,.0f} | {ours_tps / ref_tps:.2f} | "
        f"{ours_tps * fpt / 1e9:.2f} |"
    )
    if not math.isfinite(ours_tps):
        raise SystemExit("no measurement")
    distributed.teardown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from pretrain.environment import environ_defaults, single_process_world

    # DeepSpeed's engine reads LOCAL_RANK from the environment (torchrun's, absent here).
    with environ_defaults(single_process_world()):
        main(sys.argv[1:])
