"""Data loader throughput per objective, against what the tiny CPU model trains through.

For each objective (causal, causal with document ids, mlm, span) the loader serves micro-batches
in this one process (num_workers=0) for a few seconds after a warm-up; tokens/s counts model
input positions (seq_len per sequence; the encoder's for span corruption). Shard reading, the
window shuffle and the objective are all included: a run of a few seconds passes over the
stdlib training split many times. The reference is the training speed of pretrain.models.gpt.GPT
with configs/tiny.yaml shapes (plain torch.optim.AdamW, one thread, fed by the causal loader),
timed over 20 steps in the same process.

usage: python benchmarks/loader.py [--data DIR] [--seconds S] [--no-train]
Without --data it uses data/stdlib when that dataset has the mask and sentinel ids, and otherwise
builds the stdlib corpus into a temporary directory with `pretrain-data build`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.dataset import DatasetInfo  # noqa: E402
from data_pipeline.loader import make_batches  # noqa: E402

OBJECTIVES = [("causal", False), ("causal", True), ("mlm", False), ("span", False)]
# (label, seq_len, micro batch): the tiny config's shape, and a common pretraining shape.
SHAPES = [("tiny", None, None), ("1k", 1024, 8)]
ROUNDS = 5


def dataset(path: str | None, scratch: Path) -> Path:
    if path is not None:
        return Path(path)
    default = ROOT / "data/stdlib"
    if (default / "dataset.json").is_file():
        info = DatasetInfo(default)
        if info.mask_id is not None and info.sentinel_ids:
            return default
    out = scratch / "stdlib"
    cli = Path(sys.executable).parent / "pretrain-data"
    cmd = [str(cli), "build", "--stdlib", "--out", str(out), "--vocab-size", "4096"]
    print(f"building {out} (data/stdlib is missing or lacks mask/sentinel ids)", flush=True)
    subprocess.run([*cmd, "--val-fraction", "0.05", "--no-progress"], check=True)
    return out


def loader_speed(data: Path, objective: str, doc: bool, L: int, mb: int, seconds: float):
    settings = {"path": str(data), "shuffle_window": 8192, "document_mask": doc}
    batches = make_batches(settings, "train", L, 1234, mb, objective=objective)
    for _ in range(3):  # first window and shard reads, allocator
        batches.next_step()
    # The median of several rounds: the cores are shared, and a round that other work
    # interrupts should not decide the number.
    speeds = []
    for _ in range(ROUNDS):
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / ROUNDS:
            for _ in range(10):
                batches.next_step()
            steps += 10
        speeds.append(steps * mb * L / (time.perf_counter() - t0))
    return statistics.median(speeds), batches.epoch


def training_speed(data: Path, steps: int = 20) -> tuple[float, int, int]:
    """Tokens/s of GPT (configs/tiny.yaml) trained with torch AdamW on our causal batches."""
    import torch

    from pretrain import distributed
    from pretrain.config import load_config, resolve_vocab
    from pretrain.models.gpt import GPT

    cfg = load_config(ROOT / "configs/tiny.yaml", [f"data.path={data}"])
    cfg = resolve_vocab(cfg, DatasetInfo(data).vocab_size)
    layout = distributed.setup(cfg)
    try:
        torch.manual_seed(0)
        model = GPT(cfg.model, layout.tp_group, layout.tp_size)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
        L, mb = cfg.model.seq_len, cfg.parallel.micro_batch_size
        batches = make_batches(cfg.data, "train", L, 0, mb)

        def step():
            (batch,) = batches.next_step()
            model(**batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return steps * mb * L / (time.perf_counter() - t0), L, mb
    finally:
        distributed.teardown()


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="dataset directory (default: data/stdlib or a fresh build)")
    p.add_argument("--seconds", type=float, default=5.0, help="timing per measurement")
    p.add_argument("--no-train", action="store_true", help="skip the tiny-model reference")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        data = dataset(args.data, Path(scratch))
        train_tps, tiny_L, tiny_mb = (None, 32, 4) if args.no_train else training_speed(data)
        print(
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one "
            f"process; data {data}"
        )
        if train_tps is not None:
            print(
                f"tiny model training: {train_tps:,.0f} tokens/s (micro batch {tiny_mb} x {tiny_L})"
            )
        print("| objective | micro batch | tokens/s | epochs read | x tiny training |")
        print("|---|---|---|---|---|")
        for label, L, mb in SHAPES:
            L, mb = (tiny_L, tiny_mb) if label == "tiny" else (L, mb)
            for objective, doc in OBJECTIVES:
                tps, epochs = loader_speed(data, objective, doc, L, mb, args.seconds)
                name = objective + (" + doc_ids" if doc else "")
                ratio = f"{tps / train_tps:,.0f}" if train_tps else "-"
                print(f"| {name} | {mb} x {L} | {tps:,.0f} | {epochs:.1f} | {ratio} |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1:])
