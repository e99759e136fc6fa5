"""Checkpoint save and load throughput against a plain torch.save / torch.load of the same
tensors, and the time to consolidate a checkpoint for resharding, in one process.

A GPT (default GPT-2 medium, configs/models/gpt2-350m.yaml, vocabulary 50,304) is built through
pretrain.engine at ZeRO-0 fp32 and takes one optimizer step, so AdamW's moments exist. Then,
alternating so that the machine's noise hits both alike (median of --repeats):

- ours: pretrain.checkpoint.save (DeepSpeed's files, per-rank state, sha256 manifest, COMPLETE,
  rename, `latest`) and pretrain.checkpoint.load (manifest verified, DeepSpeed's load);
- reference: torch.save of {module state dict, optimizer state dict} to one file on the same
  disk, and torch.load of it;
- resharding: pretrain.reshard.ensure_universal on the saved checkpoint (consolidated copy);
- verification alone: pretrain.checkpoint.verify (the sha256 manifest, part of every load),
  so the load's figure splits into hashing and DeepSpeed's load.

GB/s counts the checkpoint's bytes on disk. The page cache is not dropped (no root needed):
load figures are warm-cache reads, for ours and the reference alike.

usage: python benchmarks/checkpoint_io.py [--model configs/models/gpt2-350m.yaml] [--repeats 3]
       python benchmarks/checkpoint_io.py --quick   (a tiny model; the test suite runs this)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1e9


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build(model_yaml: str | None, tmp: Path, quick: bool):
    import torch

    from pretrain import distributed
    from pretrain.config import load_config
    from pretrain.engine import build_engine, build_model_for

    overrides = [
        f"run.output_dir={tmp}",
        "run.name=ckpt_io",
        f"model.vocab_size={512 if quick else 50304}",
        "model.seq_len=64",
        "model.dropout=0.0",
        "parallel.micro_batch_size=1",
        "parallel.zero_stage=0",
        "tracking.enabled=false",
        "data.path=unused",
    ]
    if quick:
        overrides += ["model.n_layers=2", "model.d_model=64", "model.n_heads=4"]
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), overrides)
    if model_yaml and not quick:
        import yaml

        shape = yaml.safe_load(Path(model_yaml).read_text())["model"]
        shape.pop("seq_len", None)
        cfg = load_config(
            str(ROOT / "configs" / "tiny.yaml"),
            overrides + [f"model.{k}={v}" for k, v in shape.items()],
        )
    layout = distributed.setup(cfg)
    model = build_model_for(cfg, layout)
    engine, _ = build_engine(cfg, layout, model)
    tokens = torch.randint(0, 500, (1, 64))
    loss = engine(tokens, tokens)
    engine.backward(loss)
    engine.step()
    for p in engine.module.parameters():  # the gradients are not saved: free their memory
        p.grad = None
    return cfg, layout, engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "configs" / "models" / "gpt2-350m.yaml"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a tiny model, one repeat")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import torch

    from pretrain import checkpoint, reshard

    tmp = Path(tempfile.mkdtemp(prefix="ckpt_io_", dir=args.dir))
    try:
        cfg, layout, engine = build(args.model, tmp, args.quick)
        n_params = sum(p.numel() for p in engine.module.parameters())
        client = {"trainer": {"step": 1}, "data": {"consumed": 0}, "config": cfg.to_dict()}
        ref = tmp / "reference.pt"
        ckpt_dir = tmp / "checkpoints"
        times: dict[str, list[float]] = {k: [] for k in ("save", "ref_save", "load", "ref_load")}
        times["reshard"], times["verify"] = [], []
        repeats = 1 if args.quick else args.repeats
        for i in range(repeats):
            step = i + 1
            t = time.perf_counter()
            path = checkpoint.save(engine, layout, ckpt_dir, step, client, {}, keep_last=1)
            times["save"].append(time.perf_counter() - t)
            t = time.perf_counter()
            torch.save(
                {"module": engine.module.state_dict(), "optimizer": engine.optimizer.state_dict()},
                ref,
            )
            times["ref_save"].append(time.perf_counter() - t)
            t = time.perf_counter()
            checkpoint.load(engine, layout, path, [])
            times["load"].append(time.perf_counter() - t)
            t = time.perf_counter()  # the part of load() that a plain load does not do
            checkpoint.verify(path, layout)
            times["verify"].append(time.perf_counter() - t)
            t = time.perf_counter()
            torch.load(ref, weights_only=False)
            times["ref_load"].append(time.perf_counter() - t)
            t = time.perf_counter()
            reshard.ensure_universal(path)
            times["reshard"].append(time.perf_counter() - t)
            ours_bytes = dir_bytes(path) - dir_bytes(path / reshard.UNIVERSAL)
            ref_bytes = ref.stat().st_size
            shutil.rmtree(path / reshard.UNIVERSAL)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"## Checkpoint I/O ({datetime.date.today()})\n")
        print(
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
            f"{torch.__version__}; one process, ZeRO-0 fp32, {n_params / 1e6:.0f}M parameters "
            f"+ AdamW moments; median of {repeats}; `python benchmarks/checkpoint_io.py"
            f"{' --quick' if args.quick else ''}`\n"
        )
        print("| | ours | torch.save/load | ours / reference |")
        print("|---|---|---|---|")
        for what, ours, theirs in (("save", "save", "ref_save"), ("load", "load", "ref_load")):
            a, b = ours_bytes / med[ours] / GB, ref_bytes / med[theirs] / GB
            print(
                f"| {what} | {a:.2f} GB/s ({ours_bytes / GB:.2f} GB in {med[ours]:.1f} s) | "
                f"{b:.2f} GB/s ({ref_bytes / GB:.2f} GB in {med[theirs]:.1f} s) | {a / b:.2f} |"
            )
        rest = med["load"] - med["verify"]
        print(
            f"\nOf our load, verifying the sha256 manifest (every byte hashed on one core) took "
            f"{med['verify']:.1f} s ({ours_bytes / med['verify'] / GB:.2f} GB/s); the rest, "
            f"DeepSpeed's load_checkpoint and the per-rank state, {rest:.1f} s "
            f"({med['ref_load'] / rest if rest > 0 else float('nan'):.2f}x the reference's "
            f"speed)."
        )
        print(
            f"\nConsolidation for resharding (pretrain.reshard, weights and both moments as full "
            f"tensors): {med['reshard']:.1f} s, {ours_bytes / med['reshard'] / GB:.2f} GB/s of "
            f"checkpoint read."
        )
    finally:
        from pretrain import distributed

        distributed.teardown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from pretrain.environment import environ_defaults, single_process_world

    # DeepSpeed's engine reads LOCAL_RANK from the environment (torchrun's, absent here).
    with environ_defaults(single_process_world()):
        main()
