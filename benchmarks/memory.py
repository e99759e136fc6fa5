"""Per-rank memory by ZeRO stage, construction peak RSS, and activation peaks by recompute mode.

For GPT-2 small (configs/models/gpt2-124m.yaml, vocabulary 50,304, a short sequence) each
ZeRO stage runs as 2 data-parallel gloo processes (plus ZeRO-1 as 1 process, the reference for
the optimizer's share), builds the model through pretrain.engine.build_model_for, and takes one
optimizer step measured by pretrain.memory (the figures the start-up line prints). Each launch
also records the growth of the process's peak RSS (ru_maxrss) while the model is constructed:
ZeRO-3 builds partitioned, the other stages build whole. Then an 8-layer model in one process
measures the first step's activations saved for backward with model.recompute none, full and
selective (when the config has the key).

usage: python benchmarks/memory.py [--seq-len 128]      prints Markdown for docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 2**20


def reset_rss_peak() -> None:
    """Start the process's peak-RSS counter (VmHWM) afresh (Linux >= 4.0), so the peak read
    afterwards is the construction's own, not an earlier one (imports peak higher than the
    resident set they leave)."""
    Path("/proc/self/clear_refs").write_text("5")


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(key)


def live_heap_mib() -> float:
    """Bytes malloc has handed out and not taken back (glibc mallinfo2: heap in use plus mmapped
    blocks): the memory the process really holds, whatever the allocator keeps cached."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
            "keepcost".split()
        ]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / MiB


def one_step(config: str, overrides: list[str], out: str | None) -> dict:
    """Build, take one measured optimizer step on random tokens, return rank 0's figures."""
    import torch
    import torch.distributed as dist

    from pretrain import distributed
    from pretrain.config import load_config
    from pretrain.engine import build_engine, build_model_for, effective_zero_stage
    from pretrain.memory import FirstStepMemory
    from pretrain.models.flops import param_count

    cfg = load_config(config, overrides)
    layout = distributed.setup(cfg)
    # Imported before the baseline: the model code and DeepSpeed's ZeRO-3 modules load lazily,
    # and their import would otherwise count as construction.
    import deepspeed.runtime.zero.partition_parameters  # noqa: F401
    import deepspeed.runtime.zero.stage3  # noqa: F401

    import pretrain.models.bert  # noqa: F401
    import pretrain.models.gpt  # noqa: F401
    import pretrain.models.t5  # noqa: F401

    distributed.seed_all(cfg.run.seed)
    rss_before, live_before = _status_mib("VmRSS"), live_heap_mib()
    reset_rss_peak()
    model = build_model_for(cfg, layout)
    construction = _status_mib("VmHWM") - rss_before
    construction_live = live_heap_mib() - live_before
    engine, _ = build_engine(cfg, layout, model)
    probe = FirstStepMemory(engine, layout.device)
    probe.start()
    g = torch.Generator().manual_seed(layout.dp_rank)
    mb, s, v = cfg.parallel.micro_batch_size, cfg.model.seq_len, cfg.model.vocab_size
    for _ in range(layout.grad_accum):
        t = torch.randint(0, v, (mb, s + 1), generator=g)
        engine.backward(engine(tokens=t[:, :-1], targets=t[:, 1:]))
        engine.step()
    figures = probe.finish(1)
    figures.update(
        construction_rss_mib=construction,
        construction_live_mib=construction_live,
        rss_before_mib=rss_before,
        params=param_count(cfg.model),
        dp=layout.dp_size,
        zero=effective_zero_stage(cfg, layout.dp_size),  # the stage that ran
        recompute=getattr(cfg.model, "recompute", "none"),
    )
    gathered = [None] * layout.world_size
    dist.all_gather_object(gathered, figures)
    distributed.teardown()
    if out is not None and layout.is_main:
        Path(out).write_text(json.dumps(gathered))
    return figures


def launch(nproc: int, config: str, overrides: list[str], **env_extra: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc-per-node={nproc}", __file__, "--worker", str(out), config, *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env_extra}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"launch failed: {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-4000:]}")
        return json.loads(out.read_text())


def construction_table() -> None:
    """Construction memory of a 116M-parameter GPT (GPT-2 small's width, 16 blocks, a 4,096-token
    vocabulary so that no single layer is a large share of the model) at dp=2: built whole
    (ZeRO-0) against partitioned while built (ZeRO-3), under glibc's default allocator and with
    MALLOC_MMAP_THRESHOLD_=65536 (every block above 64 KiB mapped on its own and returned to the
    system when freed; by default glibc raises that threshold as large blocks are freed, so
    later tensors come from a heap that keeps freed memory resident)."""
    cfg = str(ROOT / "configs/models/gpt2-124m.yaml")
    shape = ["model.vocab_size=4096", "model.n_layers=16", "model.seq_len=64"]
    shape += ["model.dropout=0.0", "parallel.micro_batch_size=1"]
    print("\n| allocator | ZeRO | peak RSS growth MiB | live heap growth MiB |")
    print("|---|---|---|---|")
    ratios = {}
    for name, env in (
        ("glibc default", {}),
        ("MALLOC_MMAP_THRESHOLD_=65536", {"MALLOC_MMAP_THRESHOLD_": "65536"}),
    ):
        rows = {}
        for zero in (0, 3):
            rows[zero] = launch(2, cfg, [*shape, f"parallel.zero_stage={zero}"], **env)[0]
            r = rows[zero]
            print(
                f"| {name} | {zero} | {r['construction_rss_mib']:.0f} | "
                f"{r['construction_live_mib']:.0f} |"
            )
        ratios[name] = (
            rows[3]["construction_rss_mib"] / rows[0]["construction_rss_mib"],
            rows[3]["construction_live_mib"] / rows[0]["construction_live_mib"],
        )
    print(f"\n{rows[0]['params'] / 1e6:.1f}M parameters, dp=2, rank 0.")
    for name, (rss, live) in ratios.items():
        print(f"ZeRO-3 / unsharded, {name}: peak RSS growth {rss:.1%}, live heap growth {live:.1%}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument(
        "--only", choices=["construction", "recompute"], help="run one section of the suite"
    )
    p.add_argument("--worker", nargs=argparse.REMAINDER)
    args = p.parse_args()
    if args.worker:
        out, config, *overrides = args.worker
        one_step(config, overrides, out)
        return
    if args.only:
        {"construction": construction_table, "recompute": recompute_table}[args.only]()
        return

    gpt2 = str(ROOT / "configs/models/gpt2-124m.yaml")
    common = [
        "model.vocab_size=50304",
        f"model.seq_len={args.seq_len}",
        "model.dropout=0.0",
        "parallel.micro_batch_size=2",
    ]
    rows = []
    # One process runs ZeRO-1 as stage 0 (pretrain.engine.effective_zero_stage): ask for that.
    for nproc, zero in ((1, 0), (2, 0), (2, 1), (2, 2), (2, 3)):
        r = launch(nproc, gpt2, [*common, f"parallel.zero_stage={zero}"])[0]
        rows.append(r)
        print(f"# measured dp={nproc} zero={zero}: {r}", file=sys.stderr, flush=True)
    date = datetime.date.today().isoformat()
    print(f"Machine: {platform.node()} ({os.cpu_count()} cores), {platform.platform()}; {date}")
    print(f"GPT-2 small, {rows[0]['params'] / 1e6:.1f}M parameters, fp32, seq_len {args.seq_len},")
    print("micro batch 2, one optimizer step, rank 0 (ranks agree to a few bytes).\n")
    print(
        "| dp | ZeRO | params MiB | grads MiB | optimizer MiB | activations peak MiB |"
        " construction RSS growth MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dp']} | {r['zero']} | {r['memory_params_mib']:.1f} | "
            f"{r['memory_grads_mib']:.1f} | {r['memory_optimizer_mib']:.1f} | "
            f"{r['memory_activations_peak_mib']:.1f} | {r['construction_rss_mib']:.0f} |"
        )
    by = {(r["dp"], r["zero"]): r for r in rows}
    opt = by[(2, 1)]["memory_optimizer_mib"] / by[(1, 0)]["memory_optimizer_mib"]
    par = by[(2, 3)]["memory_params_mib"] / by[(2, 0)]["memory_params_mib"]
    print(f"\noptimizer bytes per rank, ZeRO-1 dp=2 / one process: {opt:.1%}")
    print(f"parameter bytes per rank, ZeRO-3 / ZeRO-0 at dp=2: {par:.1%}")
    construction_table()

    from pretrain.config import ModelConfig

    if "recompute" not in ModelConfig.__dataclass_fields__:
        print("\nmodel.recompute is not in this tree: activation peaks by mode not measured")
        return
    recompute_table()


def recompute_table() -> None:
    """Activations saved for backward by an 8-layer GPT under each recompute mode, without and
    with dropout: with dropout SDPA's CPU path is the math kernel, which keeps the [b, h, s, s]
    probabilities (what selective recompute exists to drop); without, the fused kernel keeps
    only its log-sum-exp."""
    gpt2 = str(ROOT / "configs/models/gpt2-124m.yaml")
    small = [
        "model.vocab_size=4096",
        "model.n_layers=8",
        "model.d_model=256",
        "model.n_heads=8",
        "model.seq_len=256",
        "parallel.micro_batch_size=4",
        "parallel.zero_stage=1",
    ]
    print("\n8-layer GPT (d 256, 8 heads, seq 256, micro batch 4), activations peak MiB:\n")
    print("| model.recompute | dropout 0 | dropout 0.1 |")
    print("|---|---|---|")
    peaks: dict[tuple[str, float], float] = {}
    for mode in ("none", "selective", "full"):
        for p in (0.0, 0.1):
            overrides = [*small, f"model.dropout={p}", f"model.recompute={mode}"]
            peaks[mode, p] = launch(1, gpt2, overrides)[0]["memory_activations_peak_mib"]
        print(f"| {mode} | {peaks[mode, 0.0]:.1f} | {peaks[mode, 0.1]:.1f} |")
    for p in (0.0, 0.1):
        print(
            f"\ndropout {p}: none / full {peaks['none', p] / peaks['full', p]:.2f}x, "
            f"none / selective {peaks['none', p] / peaks['selective', p]:.2f}x"
        )


if __name__ == "__main__":
    from pretrain.environment import environ_defaults, single_process_world

    # DeepSpeed's engine reads LOCAL_RANK from the environment (torchrun's, absent here).
    with environ_defaults(single_process_world()):
        main()
