"""The performance benchmarks run in their quick mode, so the scripts cannot rot. Their
figures are not checked (shared machines make timings meaningless here): only that each runs
to its table, and that `make bench`'s writer replaces its own section of docs/benchmarks.md
and nothing else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_e2e_parity_and_dp_scaling_quick(small_dataset, capsys):
    import dp_scaling
    import e2e_parity

    sets = [
        f"--set=data.path={small_dataset}",
        "--set=optim.warmup_steps=1",
        "--set=run.eval_interval=2",
        "--set=tracking.enabled=false",
    ]
    rows = e2e_parity.main(["configs/tiny.yaml", "--threads", "1", "--repeats", "1",
                            "--steps", "3", *sets])  # fmt: skip
    assert [(r["config"], r["threads"]) for r in rows] == [("tiny.yaml", 1)]
    assert rows[0]["ours"] > 0 and rows[0]["plain"] > 0
    # Against another checkout (here this one): two pretrain-train processes side by side.
    rows = e2e_parity.main(["configs/tiny.yaml", "--threads", "1", "--repeats", "1",
                            "--steps", "2", "--against", str(ROOT), *sets])  # fmt: skip
    assert rows[0]["ours"] > 0 and rows[0]["plain"] > 0
    out = capsys.readouterr().out
    assert f"reference ({ROOT}) tokens/s" in out
    ratio = dp_scaling.main(["configs/tiny.yaml", "--steps", "2", "--repeats", "1", *sets[:2]])
    assert ratio > 0
    out += capsys.readouterr().out
    assert "| tiny.yaml | 1 |" in out and "ratio 2/1" in out
    kernels = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/tp1_kernels.py"), "--rounds", "1", "--calls", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "| cross-entropy" in kernels.stdout


@pytest.mark.slow  # two 2-rank launches of the tiny config, one with the old imports put back
def test_startup_quick(small_dataset):
    cmd = [sys.executable, str(ROOT / "benchmarks/startup.py"), "--rounds", "1"]
    out = subprocess.run(
        [*cmd, "--data", small_dataset],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "| process groups |" in out and "| engine |" in out
    assert "(mlflow, pyarrow, compile: before)" in out and "start-up: before" in out


@pytest.mark.slow  # the tokenizer benchmark starts worker processes
def test_tokenization_and_shard_checksum_quick(small_dataset):
    """Two scripts without a quick setting of their own, run at their smallest: one round of
    the bytes tokenizer (no BPE training), and the checksum over the small dataset."""
    tok = [sys.executable, str(ROOT / "benchmarks/tokenization.py"), "--tokenizer", "bytes"]
    out = subprocess.run(
        [*tok, "--rounds", "1", "--workers", "2"], capture_output=True, text=True, check=True
    ).stdout
    assert "| bytes | 2 |" in out and "HF encode_batch" in out
    checksum = [sys.executable, str(ROOT / "benchmarks/shard_checksum.py"), "--data"]
    out = subprocess.run(
        [*checksum, small_dataset], capture_output=True, text=True, check=True
    ).stdout
    assert "read with sha256" in out


@pytest.mark.slow  # four fresh processes, three of them importing DeepSpeed and megatron-core
def test_loader_throughput_moe_and_fit_recovery_quick(small_dataset):
    """The other benchmark scripts of docs/benchmarks.md that run in one process, each at its
    smallest setting: make bench's loader entry (its quick arguments), the in-process
    throughput ratio, the MoE comparison and the scaling-law fit recovery."""

    def run(script: str, *args: str) -> str:
        cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout

    import suite

    loader_args = suite.SUITE["loader"][3]
    assert "| span | 4 x 32 |" in run("loader.py", "--data", small_dataset, *loader_args)
    assert "| tiny.yaml | 1 |" in run(
        "throughput.py", "configs/tiny.yaml", f"data.path={small_dataset}"
    )
    out = run(
        "moe.py", "--steps", "6", "--window", "1", "--eval-batches", "1", "--data", small_dataset
    )
    assert "| dense |" in out and "| switch, no router losses |" in out
    assert "| wide |" in run("scaling_fit_recovery.py", "--seeds", "1")


@pytest.mark.slow
def test_parity_breakdown_quick(capsys):
    import parity_breakdown

    ratios = parity_breakdown.main(["--steps", "2", "--repeats", "1"])
    assert set(ratios) == {"plain", "model", "engine"} and ratios["plain"] == 1.0
    assert "| engine |" in capsys.readouterr().out


@pytest.mark.slow
def test_model_ab_quick():
    # Its own process: the benchmark sets up a world of one, which this pytest process may
    # hold already from other tests.
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/model_ab.py"), "--calls", "2", "--profile"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "ours runs at" in out and "| aten::" in out


@pytest.mark.slow
def test_speed_options_quick(small_dataset, capsys):
    import speed_options

    rows = speed_options.main(
        ["configs/tiny.yaml", "--repeats", "1", "--steps", "4",
         "--option", "fused AdamW=optim.implementation=fused",
         f"--set=data.path={small_dataset}", "--set=optim.warmup_steps=1",
         "--set=run.log_interval=1"]
    )  # fmt: skip
    assert [r["option"] for r in rows] == ["fused AdamW"]
    assert rows[0]["cpu_ratio"] > 0 and rows[0]["steady_speedup"] > 0
    assert "| fused AdamW (`optim.implementation=fused`) |" in capsys.readouterr().out


def test_suite_writes_only_its_section(tmp_path, monkeypatch):
    import suite

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-written text\n")
    monkeypatch.setitem(suite.SUITE, "missing", ("A missing one", "no_such_script.py", [], []))
    monkeypatch.setattr(suite, "machine", lambda: "test machine")
    suite.main(["--quick", "--only", "missing", "--out", str(doc)])
    first = doc.read_text()
    assert "hand-written text" in first and "skipped: benchmarks/no_such_script.py" in first
    suite.write_section(doc, "second body")
    second = doc.read_text()
    assert "hand-written text" in second and "second body" in second
    assert "no_such_script" not in second and second.count(suite.BEGIN) == 1


def test_plain_gpt_trains_from_a_flat_file(tmp_path, capsys):
    """The reference script itself: a few steps on a flat token file, loss printed, summary."""
    import numpy as np
    import plain_gpt

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, 64, 4000, dtype=np.uint16).tofile(tmp_path / f"{split}.bin")
    tok_s = plain_gpt.main([
        f"--train={tmp_path / 'train.bin'}", f"--val={tmp_path / 'val.bin'}", "--vocab=64",
        "--layers=1", "--d-model=32", "--heads=2", "--seq-len=16", "--micro-batch=2",
        "--steps=3", "--warmup=1", "--log-interval=1", "--eval-interval=2", "--eval-batches=1",
        f"--out={tmp_path}",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert tok_s > 0 and "step 3 | loss" in out and "val loss" in out
    assert (tmp_path / "step3.pt").exists()


def test_dp_io_counts_bytes(small_dataset, capsys):
    """The bytes-per-rank benchmark runs in quick mode and counts reads (the ratios are
    reported in docs/benchmarks.md, not asserted here)."""
    import dp_io

    ratios = dp_io.main(["--data", small_dataset, "--steps", "2", "--seq-len", "32",
                         "--global-batch", "4"])  # fmt: skip
    assert list(ratios) == [(32, 1), (32, 4)] and min(ratios.values()) > 0
    assert dp_io.bytes_read(small_dataset, 1, 0, 2, 32, 4) > 0
    out = capsys.readouterr().out
    assert "| 32 | 2 | whole shards (no index) |" in out
    assert "| 32 | 2 | range reads, runs of 4 |" in out


@pytest.mark.slow
def test_checkpoint_io_quick(tmp_path):
    """benchmarks/checkpoint_io.py end to end on a tiny model: our save, load and consolidation
    against torch.save/load, one table row each (no timing asserted)."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/checkpoint_io.py"),
            "--quick",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| save |" in proc.stdout and "| load |" in proc.stdout
    assert "Consolidation for resharding" in proc.stdout
    assert "verifying the sha256 manifest" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # its temporary checkpoints are removed
