"""Attention at long context on the CPU: time and peak memory of one attention core's forward
and backward by kernel and sequence length, and generation speed with and without a KV cache.

Kernels (pretrain.models.attention), fp32, batch 1, 2 heads of 64:
  dense-mask   SDPA with a materialised [1, 1, s, s] causal mask (what document masks cost
               before issue 13)
  causal       SDPA with is_causal and no mask (the fused / flash path)
  window       sliding window W=256, causal (the chunked kernel, blocks of 256 queries)
  longformer   |q - k| < 256 plus global position 0, bidirectional (the chunked kernel)
Peak memory: the growth of the process's peak resident set (VmHWM, reset before each run)
over the resident set before it, with glibc's mmap threshold fixed so freed buffers go back
to the system (the script re-executes itself with MALLOC_MMAP_THRESHOLD_ set).

Generation: a GPT of 2 layers, d_model 128, 4 heads, rotary, seq_len 2048; greedy, 32 new
tokens after a prompt of N - 32 tokens, N = 128, 512, 2048; tokens/s = 32 / wall time of
pretrain.generate.generate (the prompt pass included), with kv_cache on and off, and cached
with a window of 256.

usage: .venv/bin/python benchmarks/attention.py [--quick] [--plot docs/attention_scaling.png]
  prints Markdown for docs/benchmarks.md; --quick: tiny sizes, for the test that keeps it
  runnable (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 2**20
KERNELS = ("dense-mask", "causal", "window", "longformer")


def _vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise KeyError(key)


def peak_growth_mib(fn) -> tuple[float, float]:
    """(seconds, MiB): fn's wall time and how far the resident set peaked above where it
    started."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _vm("VmRSS")
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, _vm("VmHWM") - before


def core(kernel: str, s: int, window: int, heads: int = 2, e: int = 64):
    """A closure running one forward + backward of the kernel at length s."""
    import torch
    import torch.nn.functional as F

    from pretrain.models import attention as A

    def run():
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, s, e, generator=g, requires_grad=True) for _ in "qkv")
        if kernel == "dense-mask":
            keep = torch.ones(s, s, dtype=torch.bool).tril()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None, None])
        elif kernel == "causal":
            out = A.attend(q, k, v, A.AttentionMask(causal=True))
        elif kernel == "window":
            out = A.attend(q, k, v, A.AttentionMask(causal=True), window=window)
        else:
            out = A.attend(q, k, v, A.AttentionMask(global_positions=(0,)), window=window)
        out.sum().backward()

    return run


def attention_table(seqs: list[int], window: int, reps: int) -> dict[str, dict[int, tuple]]:
    results: dict[str, dict[int, tuple]] = {k: {} for k in KERNELS}
    for s in seqs:
        for kernel in KERNELS:
            run = core(kernel, s, window)
            if s == seqs[0]:
                run()  # warm-up: first-call allocations and kernel selection
            runs = [peak_growth_mib(run) for _ in range(reps)]
            results[kernel][s] = (
                statistics.median(t for t, _ in runs),
                max(m for _, m in runs),
            )
            print(f"  {kernel:11s} s={s:5d} {results[kernel][s]}", file=sys.stderr)
    return results


def generation_table(lengths: list[int], new: int, window: int) -> dict[str, dict[int, float]]:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from pretrain.config import ModelConfig
    from pretrain.generate import generate
    from pretrain.models.gpt import GPT

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("gloo", rank=0, world_size=1)
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
    group = ps.get_tensor_model_parallel_group()
    seq_len = max(lengths)
    base = dict(n_layers=2, d_model=128, n_heads=4, seq_len=seq_len, vocab_size=256)
    torch.manual_seed(0)
    full = GPT(ModelConfig(positions="rope", **base), group)
    torch.manual_seed(0)
    windowed = GPT(
        ModelConfig(positions="rope", attention="sliding_window", attention_window=window, **base),
        group,
    )
    rows = {"uncached": {}, "cached": {}, "cached, window": {}}
    for n in lengths:
        prompt = torch.randint(0, 256, (n - new,), generator=torch.Generator().manual_seed(n))
        for name, model, cache in (
            ("uncached", full, False),
            ("cached", full, True),
            ("cached, window", windowed, True),
        ):
            t0 = time.perf_counter()
            generate(model, prompt.tolist(), new, seq_len=seq_len, vocab_limit=256, kv_cache=cache)
            rows[name][n] = new / (time.perf_counter() - t0)
            print(f"  {name:15s} N={n:5d} {rows[name][n]:.1f} tok/s", file=sys.stderr)
    return rows


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for kernel, by_s in results.items():
        seqs = sorted(by_s)
        ax_t.plot(seqs, [by_s[s][0] for s in seqs], marker="o", label=kernel)
        ax_m.plot(seqs, [max(by_s[s][1], 0.1) for s in seqs], marker="o", label=kernel)
    for ax, what in ((ax_t, "forward + backward (s)"), (ax_m, "peak memory growth (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend()
    fig.suptitle(
        "Attention core on the CPU, fp32, 2 heads x 64, window 256 (benchmarks/attention.py)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(results, gen, seqs, lengths, new: int) -> str:
    import torch

    ref = seqs[0]
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {datetime.date.today()}.",
        "",
        "| kernel | " + " | ".join(f"s={s}" for s in seqs) + " |",
        "|---|" + "---|" * len(seqs),
    ]
    for kernel, by_s in results.items():
        cells = [f"{by_s[s][0]:.3g} s, {by_s[s][1]:.0f} MiB" for s in seqs]
        lines.append(f"| {kernel} | " + " | ".join(cells) + " |")
    lines += ["", f"Growth from s={ref} (time x, memory x):", ""]
    lines.append("| kernel | " + " | ".join(f"s={s}" for s in seqs[1:]) + " |")
    lines.append("|---|" + "---|" * (len(seqs) - 1))
    for kernel, by_s in results.items():
        t0, m0 = by_s[ref]
        cells = [f"{by_s[s][0] / t0:.1f}x, {by_s[s][1] / max(m0, 1):.1f}x" for s in seqs[1:]]
        lines.append(f"| {kernel} | " + " | ".join(cells) + " |")
    lines += ["", f"Generation (tokens/s, {new} new tokens, prompt pass included):", ""]
    lines.append("| path | " + " | ".join(f"N={n}" for n in lengths) + " |")
    lines.append("|---|" + "---|" * len(lengths))
    for name, by_n in gen.items():
        cells = [f"{by_n[n]:.1f} ({by_n[n] / gen['uncached'][n]:.1f}x)" for n in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (the test's smoke run)")
    p.add_argument("--plot", type=Path, help="write the growth plot here (PNG)")
    args = p.parse_args(argv)
    if args.quick:
        seqs, window, reps, lengths, new = [64, 128], 16, 1, [16, 24], 4
    else:
        seqs, window, reps, lengths, new = (
            [512, 1024, 2048, 4096, 8192],
            256,
            2,
            [128, 512, 2048],
            32,
        )
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = attention_table(seqs, window, reps)
    gen = generation_table(lengths, new, window)
    if args.plot:
        plot(results, args.plot)
    text = markdown(results, gen, seqs, lengths, new)
    print(text)
    return text


if __name__ == "__main__":
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # fixed threshold: freed buffers leave RSS
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    main()
