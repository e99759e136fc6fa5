"""A real scaling-law sweep on the CPU: 4 character-level GPT sizes x 3 token budgets with
warmup-stable-decay (4 runs from scratch, 8 cooldowns branched from their checkpoints), each one
training process.
`pretrain-sweep run` is killed after its first point, run again (only the missing points
train), then `fit` reads the runs back from MLflow, fits, plots and logs to the parent run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pretrain.scaling import cli
from pretrain.scaling.runner import PARENT_FILE, is_done, order
from pretrain.scaling.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
SWEEP = [sys.executable, "-m", "pretrain.scaling.cli"]


def tiny_spec(tmp_path: Path, dataset: str) -> Path:
    spec = yaml.safe_load((REPO / "configs" / "sweeps" / "tiny.yaml").read_text())
    spec["base"] = str((REPO / "configs" / "sweeps" / spec["base"]).resolve())
    spec["output_dir"] = str(tmp_path / "sweeps")
    spec["overrides"] = spec["overrides"] + [f"data.path={dataset}"]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_tiny_sweep_plan_run_resume_fit(bytes_dataset, tmp_path, capsys):
    path = tiny_spec(tmp_path, bytes_dataset)
    assert cli.main(["plan", str(path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 1 + 12 + 1 and all(ln.split()[-1] == "todo" for ln in table[1:13])

    meta = json.loads((Path(bytes_dataset) / "dataset.json").read_text())
    spec = load_spec(path, vocab_size=meta["tokenizer"]["vocab_size"])
    first = order(spec)[0]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Kill the sweep (and its training process) as soon as its first point has finished.
    proc = subprocess.Popen(
        [*SWEEP, "run", str(path)],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 900
    while not is_done(spec, first) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if proc.poll() is None:  # else it ended by itself (failed): its output says why below
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert is_done(spec, first), proc.stdout.read()[-3000:]
    done_before = [p.id for p in spec.points if is_done(spec, p)]
    log_first = spec.sweep_dir / f"{spec.name}-{first.id}" / "train.log"
    size_before = log_first.stat().st_size

    again = subprocess.run(
        [*SWEEP, "run", str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    skipped = [ln.split(":")[0] for ln in again.stdout.splitlines() if ln.endswith("done, skipped")]
    trained = [ln.split(":")[0] for ln in again.stdout.splitlines() if ": training " in ln]
    assert sorted(skipped) == sorted(done_before) and first.id in skipped
    assert sorted(trained) == sorted(p.id for p in spec.points if p.id not in done_before)
    assert log_first.stat().st_size == size_before  # the finished point was not touched

    assert cli.main(["fit", str(path), "--bootstrap", "20", "--budget", "3e11"]) == 0
    print(capsys.readouterr().out)
    out = spec.sweep_dir / "fit"
    result = json.loads((out / "fit.json").read_text())
    assert result["runs"] == 12
    for png in ("loss_vs_compute.png", "isoflop_profiles.png", "fit_vs_observed.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from mlflow.tracking import MlflowClient

    parent = (spec.sweep_dir / PARENT_FILE).read_text().strip()
    client = MlflowClient(f"sqlite:///{spec.sweep_dir / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(parent, "fit")}
    assert {"fit/fit.json", "fit/fit_vs_observed.png"} <= logged
    r2 = result["approach3"]["r2"]
    print(f"tiny sweep: L(N, D) fit R^2 = {r2:.4f}")
    assert r2 >= 0.95, result["observations"]
