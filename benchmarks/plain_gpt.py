"""The reference for end-to-end parity: a minimal plain-PyTorch GPT training script.

What a user would write by hand (the nanoGPT loop): GPT-2 architecture with nn.Linear and SDPA,
token ids read from a flat binary file (np.memmap), torch AdamW with decayed and undecayed
groups, linear warmup then cosine decay, global-norm clipping, a loss print every
`--log-interval` steps, a validation pass over `--eval-batches` batches every
`--eval-interval` steps and at the end, and a torch.save of model and optimizer every
`--ckpt-interval` steps and at the end. One process; nothing of this project is imported, so
it pays none of its start-up or per-step costs.

usage: python benchmarks/plain_gpt.py --train FILE --val FILE --vocab V [options]
The last line printed is "trained N steps in S s (T tokens/s)", the same summary
`pretrain-train` prints, measured over the same span (the loop, evaluations and saves).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
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


class PlainGPT(nn.Module):
    """pretrain.models.gpt.GPT's default architecture (learned positions, pre-LN, GELU, biases,
    tied output projection) in plain PyTorch, [b, s, d] layout."""

    def __init__(self, vocab: int, seq_len: int, n_layers: int, d: int, h: int, f: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, h, f) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = (
                    0.02 / math.sqrt(2 * n_layers)
                    if name.endswith(("proj.weight", "down.weight"))
                    else 0.02
                )
                nn.init.normal_(p, std=std)

    def forward(self, x, y):
        h = self.tok(x) + self.pos.weight[: x.shape[1]]
        for blk in self.blocks:
            h = blk(h)
        logits = self.ln_f(h) @ self.tok.weight.T
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", type=Path, required=True, help="flat token file (uint16 or --dtype)")
    p.add_argument("--val", type=Path, required=True)
    p.add_argument("--dtype", default="uint16")
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-lr", type=float, default=3e-5)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--ckpt-interval", type=int, default=0, help="0: save only at the end")
    p.add_argument("--out", type=Path, default=None, help="checkpoint directory (default: temp)")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    L, B = a.seq_len, a.micro_batch
    train = np.memmap(a.train, dtype=a.dtype, mode="r")
    val = np.memmap(a.val, dtype=a.dtype, mode="r")
    n_train = (len(train) - 1) // L
    rng = np.random.default_rng(a.seed)

    def batch(tokens: np.ndarray, starts: np.ndarray):
        rows = np.stack([tokens[s * L : s * L + L + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    model = PlainGPT(a.vocab, L, a.layers, a.d_model, a.heads, 4 * a.d_model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("pos")]
    other = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith("pos")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": other, "weight_decay": 0}],
        lr=a.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    def lr_at(step: int) -> float:
        if step < a.warmup:
            return (step + 1) / a.warmup
        progress = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup))
        floor = a.min_lr / a.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    out = a.out or Path(tempfile.mkdtemp(prefix="plain_gpt_"))

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total = 0.0
        for i in range(a.eval_batches):
            x, y = batch(val, np.arange(i * B, (i + 1) * B) % ((len(val) - 1) // L))
            total += model(x, y).item()
        model.train()
        return total / a.eval_batches

    order, pos = rng.permutation(n_train), 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    for step in range(1, a.steps + 1):
        if pos + B > n_train:
            order, pos = rng.permutation(n_train), 0
        x, y = batch(train, order[pos : pos + B])
        pos += B
        loss = model(x, y)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % a.log_interval == 0 or step == a.steps:
            print(f"step {step} | loss {loss.item():.4f} | grad {norm.item():.3f}", flush=True)
        if (a.eval_interval and step % a.eval_interval == 0) or step == a.steps:
            print(f"step {step} | val loss {evaluate():.4f}", flush=True)
        if (a.ckpt_interval and step % a.ckpt_interval == 0) or step == a.steps:
            torch.save(
                {"model": model.state_dict(), "optim": opt.state_dict(), "step": step},
                out / f"step{step}.pt",
            )
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    tok_s = a.steps * B * L / elapsed
    tokens = a.steps * B * L
    print(f"training CPU time: {cpu:.1f} s ({tokens / max(cpu, 1e-9):,.0f} tokens per CPU second)")
    print(f"trained {a.steps} steps in {elapsed:.0f} s ({tok_s:,.0f} tokens/s)", flush=True)
    return tok_s


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    main()
