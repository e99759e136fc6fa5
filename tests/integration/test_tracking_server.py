"""MLflow against a real `mlflow server` on 127.0.0.1 (SQLite backend and local artifact store in
a temporary directory), single-process tiny runs through `pretrain-train`:

  base     10 steps, a child of a sweep's parent run: params, tags, metrics, artifacts read back
  branch   starts from base's step-5 checkpoint under a new name, stops after 3 steps
  branch'  resumes branch; the server is stopped at step 10 and restarted only once the loop
           has finished, so training runs through the outage and the records reach the store
           after it

One module-scoped fixture runs them (server starts and launches cost minutes on a loaded
machine); the tests read the results."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = str(ROOT / "configs" / "tiny.yaml")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
WAIT = 900  # seconds: this machine is shared and may be heavily loaded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = WAIT, proc=None) -> float:
    t0 = time.monotonic()
    while not check():
        assert proc is None or proc.poll() is None, f"exited before {what}"
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)
    return time.monotonic()


class Server:
    def __init__(self, tmp: Path):
        self.tmp, self.port, self.proc = tmp, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self) -> None:
        log = (self.tmp / "server.log").open("a")
        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.tmp / 'server.db'}",
                "--artifacts-destination",
                str(self.tmp / "server-artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers in one process group, stopped together
        )
        wait_for(self.healthy, "the MLflow server", proc=self.proc)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        wait_for(lambda: not self.healthy(), "the server to stop", timeout=60)


def train(out: Path, name: str, uri: str, *overrides: str, wait: bool = True):
    cmd = [
        str(BIN / "pretrain-train"),
        TINY,
        f"run.output_dir={out}",
        f"run.name={name}",
        f"tracking.uri={uri}",
        "run.sample_tokens=0",
        "optim.warmup_steps=1",
        *overrides,
    ]
    log = out.parent / f"{name}-{time.monotonic_ns()}.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=ENV, stdout=f, stderr=subprocess.STDOUT, text=True)
    if wait:
        rc = proc.wait(WAIT)
        assert rc == 0, log.read_text()[-5000:]
    return proc, log


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, small_dataset):
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("mlflow_server")
    out = tmp / "runs"
    server = Server(tmp)
    server.start()
    try:
        client = MlflowClient(server.uri)
        exp = client.create_experiment("pretrain")
        sweep = client.create_run(exp, run_name="sweep").info.run_id
        data = f"data.path={small_dataset}"
        train(
            out,
            "base",
            server.uri,
            data,
            "run.train_steps=10",
            "run.log_interval=5",
            "run.eval_interval=5",
            "checkpoint.interval=5",
            f"tracking.parent_run_id={sweep}",
            "tracking.tags=[sweep=ladder, point=3]",
        )
        fork = out / "base" / "checkpoints" / "step_00000005"
        branch = [data, "run.train_steps=40", "run.log_interval=1", "run.eval_interval=0"]
        train(out, "branch", server.uri, *branch, f"run.resume={fork}", "run.exit_after_steps=3")

        proc, log = train(
            out, "branch", server.uri, *branch, "tracking.flush_timeout=900", wait=False
        )
        train_log = out / "branch" / "train.log"
        text = lambda: train_log.read_text() if train_log.exists() else ""  # noqa: E731
        wait_for(lambda: "step     10/40" in text(), "step 10 of the resumed branch", proc=proc)
        server.stop()
        stopped = time.monotonic()
        # The loop must finish while the store is away: it does not wait for it.
        finished = wait_for(lambda: "trained 32 steps" in text(), "the end of training", proc=proc)
        outage_training_s = finished - stopped
        server.start()
        rc = proc.wait(WAIT)
        assert rc == 0, log.read_text()[-5000:]
        yield {
            "client": client,
            "exp": exp,
            "sweep": sweep,
            "out": out,
            "fork": fork,
            "resumed_log": log.read_text(),
            "outage_training_s": outage_training_s,
        }
    finally:
        server.stop()


def only_run(t, name: str):
    found = t["client"].search_runs([t["exp"]], f"attributes.run_name = '{name}'")
    assert len(found) == 1, [r.info.run_id for r in found]
    return found[0]


def history(t, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in t["client"].get_metric_history(run.info.run_id, key))


def test_params_hold_the_resolved_config(tracked):
    p = only_run(tracked, "base").data.params
    assert p["model.n_layers"] == "2" and p["run.name"] == "base"
    # Resolved at launch, not the config's null: one process is dp 1, no accumulation, and
    # the global batch is the micro-batch of 4.
    assert (p["parallel.dp"], p["parallel.world_size"], p["parallel.grad_accum"]) == ("1", "1", "1")
    assert p["parallel.global_batch_size"] == "4"


def test_tags_name_the_code_the_model_the_data_and_the_host(tracked):
    from pretrain.config import load_config
    from pretrain.models.flops import param_count

    tags = only_run(tracked, "base").data.tags
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert tags["pretrain.git_commit"].removesuffix("+dirty") == head
    assert tags["pretrain.family"] == "gpt"
    assert tags["pretrain.layout"] == "dp1-tp1-pp1-zero0"
    cfg = load_config(TINY, ["model.vocab_size=512"])  # the test dataset's vocabulary
    assert tags["pretrain.params"] == str(param_count(cfg.model))
    assert tags["pretrain.params_non_embedding"] == str(param_count(cfg.model, embeddings=False))
    assert re.fullmatch(r"[0-9a-f]{64}", tags["pretrain.dataset_fingerprint"])
    assert tags["pretrain.host"] == socket.gethostname()
    # A sweep's point: a child of the sweep's run, with the sweep's tags.
    assert tags["mlflow.parentRunId"] == tracked["sweep"]
    assert (tags["sweep"], tags["point"]) == ("ladder", "3")


def test_metrics_arrive_per_log_step(tracked):
    base = only_run(tracked, "base")
    for key in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "memory_rss_peak_mib"):
        assert [s for s, _ in history(tracked, base, key)] == [5, 10], key
    # 4 sequences of 32 tokens per step
    assert history(tracked, base, "tokens_seen") == [(5, 5 * 4 * 32), (10, 10 * 4 * 32)]
    assert all(v > 0 for _, v in history(tracked, base, "memory_rss_peak_mib"))
    assert base.info.status == "FINISHED"


def test_artifacts_are_the_config_and_a_loss_curve(tracked, tmp_path):
    base = only_run(tracked, "base")
    client = tracked["client"]
    assert sorted(a.path for a in client.list_artifacts(base.info.run_id)) == [
        "config.yaml",
        "loss_curve.png",
    ]
    cfg = Path(client.download_artifacts(base.info.run_id, "config.yaml", str(tmp_path)))
    assert cfg.read_text() == (tracked["out"] / "base" / "config.yaml").read_text()
    png = Path(client.download_artifacts(base.info.run_id, "loss_curve.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_a_branch_is_a_new_run_tagged_with_its_parent(tracked):
    base, branch = only_run(tracked, "base"), only_run(tracked, "branch")
    assert branch.info.run_id != base.info.run_id
    assert branch.data.tags["pretrain.branched_from_run"] == base.info.run_id
    assert branch.data.tags["pretrain.branched_from_checkpoint"] == str(tracked["fork"])
    # The branch wrote nothing into the run it came from.
    assert [s for s, _ in history(tracked, base, "loss")] == [5, 10]


def test_a_resumed_run_continues_its_mlflow_run(tracked):
    branch = only_run(tracked, "branch")  # one run for both launches
    # steps 6-8 from the first launch, 9-40 from the resumed one
    assert [s for s, _ in history(tracked, branch, "loss")] == list(range(6, 41))
    assert branch.info.status == "FINISHED"


def test_training_runs_through_a_server_outage_and_delivers_afterwards(tracked):
    log = tracked["resumed_log"]
    assert log.count("MLflow: cannot reach") == 1  # warned once
    # Everything logged while the server was down arrived once it was back: the loss of every
    # step (test above) and the end of the run.
    branch = only_run(tracked, "branch")
    assert sorted(a.path for a in tracked["client"].list_artifacts(branch.info.run_id)) == [
        "config.yaml",
        "loss_curve.png",
    ]
    # The 30 steps after the stop took seconds, as they do with the server up (measured on
    # 2026-11-30 on the loaded test machine: under 20 s); a loop waiting on the dead server
    # would sit in MLflow's request retries (minutes per call).
    assert tracked["outage_training_s"] < 120
