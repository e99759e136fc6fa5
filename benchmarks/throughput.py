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
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.loader import DatasetInfo, make_batches  # noqa: E402
from pretrain import distributed  # noqa: E402
from pretrain.config import load_config, resolve_vocab  # noqa: E402
from pretrain.engine import build_engine  # noqa: E402
from pretrain.models import build_model  # noqa: E402
from pretrain.models.flops import flops_per_token, param_count  # noqa: E402


class RefBlock(nn.Module):
    def __init__(self, d: int, h: int, f: int):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class RefGPT(nn.Module):
    """The same architecture as pretrain.models.gpt.GPT in plain PyTorch ([b, s, d])."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.d_model
        self.tok = nn.Embedding(cfg.vocab_size, d)
        self.pos = nn.Embedding(cfg.seq_len, d)
        self.blocks = nn.ModuleList(
            RefBlock(d, cfg.n_heads, cfg.ffn_size) for _ in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(d)

    def forward(self, x, y):
        h = self.tok(x) + self.pos.weight[: x.shape[1]]
        for blk in self.blocks:
            h = blk(h)
        logits = self.ln_f(h) @ self.tok.weight.T
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())


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

    ref = RefGPT(cfg.model).to(device)
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
    main(sys.argv[1:])
