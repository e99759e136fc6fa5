"""A run's life as a user sees it, through `pretrain-launch`: stop signals reach every rank and
leave a checkpoint, a resume continues bitwise, a second Ctrl-C stops everything, no process of
a run outlives it (loader workers included), and each error is one `error:` line with exit 2
and no run folder left behind."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = "configs/tiny.yaml"
MARK = "PRETRAIN_TEST_RUN_MARK"  # inherited by every process of a run: how leftovers are found
TIMEOUT = 420


def leftovers(mark: str) -> list[str]:
    """Command lines of live processes that carry `mark` in their environment."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            if f"{MARK}={mark}".encode() not in environ.split(b"\0"):
                continue
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                found.append(
                    Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                )
        except OSError:
            continue
    return found


class Launch:
    """`pretrain-launch` in a real process, its output read as it comes."""

    def __init__(self, *args: str, nproc: int = 2, cmd: list[str] | None = None):
        """`cmd` instead of pretrain-launch: a torchrun command started without it."""
        self.mark = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        self.proc = subprocess.Popen(
            cmd or [str(BIN / "pretrain-launch"), TINY, "--nproc-per-node", str(nproc), *args],
            cwd=REPO,
            env={"OMP_NUM_THREADS": "1", **env, MARK: self.mark},  # as pretrain-launch sets it
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for r in self.readers:
            r.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in iter(stream.readline, ""):
            lines.append(line)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(re.search(pattern, line) for line in self.out):
                return
            assert self.proc.poll() is None, f"ended before {pattern!r}:\n{self.text()}"
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.text()}")

    def wait_for_process(self, needle: str, timeout: float = TIMEOUT) -> None:
        """Until a process of this run has `needle` in its command line."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(needle in cmd for cmd in leftovers(self.mark)):
                return
            assert self.proc.poll() is None, f"ended before {needle!r}:\n{self.text()}"
            time.sleep(0.05)
        raise AssertionError(f"no {needle!r} process within {timeout} s:\n{self.text()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def finish(self, timeout: float = TIMEOUT) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"pretrain-launch hung:\n{self.text()}") from None
        for r in self.readers:
            r.join(timeout=10)
        # Whatever the launcher left behind had its chance to exit with it.
        deadline = time.monotonic() + 5
        while leftovers(self.mark) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert leftovers(self.mark) == [], f"processes outlived the run:\n{self.text()}"
        return rc

    def text(self) -> str:
        return "".join(self.out) + "---- stderr\n" + "".join(self.err)


def run_args(data: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return [
        f"data.path={data}",
        f"run.output_dir={runs}",
        f"run.name={name}",
        "tracking.enabled=false",
        "parallel.zero_stage=3",
        *extra,
    ]


def third_party_lines(text: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if "site-packages" in line or "Warning" in line or "warnings.warn" in line
    ]


def tensors(obj, prefix: str = ""):
    """(path, tensor) of every tensor inside nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.pt")):
        for key, t in tensors(torch.load(f, weights_only=False, map_location="cpu")):
            out[f"{f.name}{key}"] = t
    return out


def assert_one_error_line(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# --- errors found before any process group: the entry point in this process ------------------


@pytest.fixture
def train_main(monkeypatch, capsys):
    """pretrain.train.main in this process, its process-wide settings (signal handlers, the
    warning printer) restored afterwards; returns (exit code, stdout, stderr)."""
    from pretrain import train

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PRETRAIN_ERROR_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", os.environ.get("MLFLOW_LOGGING_LEVEL", "INFO"))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    monkeypatch.chdir(REPO)

    def call(*args: str, world: int = 1) -> tuple[int, str, str]:
        # Rank 0 of `world` before its process group: what torchrun's ranks see in prepare().
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", "0")
        capsys.readouterr()
        rc = train.main([TINY, *args])
        out, err = capsys.readouterr()
        return rc, out, err

    yield call
    for s, h in handlers.items():
        signal.signal(s, h)


@pytest.fixture(scope="module")
def short_val(tmp_path_factory) -> Path:
    """A dataset whose validation split is one short document: enough for training at a
    sequence length the validation split cannot fill."""
    from data_pipeline.build import build
    from data_pipeline.sources import stdlib_sources

    files = [p for p in stdlib_sources() if p.stat().st_size > 2000][:6]
    out = tmp_path_factory.mktemp("data") / "short_val"
    build([str(p) for p in files], out, vocab_size=512, val_fraction=0.01, progress=False)
    return out


def test_prepare_refuses_short_validation_split_and_truncated_shard(
    train_main, short_val, tmp_path
):
    meta = json.loads((short_val / "dataset.json").read_text())
    val_tokens = meta["splits"]["val"]["tokens"]
    assert meta["splits"]["train"]["tokens"] > 4 * (val_tokens + 64)
    runs = tmp_path / "runs"
    seq_len = val_tokens + 32
    base = [f"data.path={short_val}", f"run.output_dir={runs}", "tracking.enabled=false"]
    rc, out, err = train_main(*base, f"model.seq_len={seq_len}")
    assert_one_error_line(rc, err, "'val' split", str(short_val), "seq_len")
    assert not runs.exists()
    # Without evaluation the validation split is not read, so the same length is fine: the
    # refusal above is the validation split's.
    copy = tmp_path / "truncated"
    shutil.copytree(short_val, copy)
    shard = copy / "train" / "train-000000.tar"
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    rc, out, err = train_main(
        f"data.path={copy}", f"run.output_dir={runs}", "tracking.enabled=false"
    )
    assert_one_error_line(rc, err, "train-000000.tar", "truncated", "pretrain-data verify")
    assert not runs.exists()


# --- signals through pretrain-launch ------------------------------------------------------------


def _flip_in_range(shard: Path) -> None:
    """Flip the lowest bit of one token id in the shard's first document: the id stays below
    the (even) vocabulary size, so only the checksum can tell."""
    data = bytearray(shard.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r:") as tar:
        member = next(m for m in tar.getmembers() if m.isfile() and m.size > 256)
    fp = io.BytesIO(bytes(data[member.offset_data : member.offset_data + 4096]))
    np.lib.format.read_magic(fp)
    np.lib.format.read_array_header_1_0(fp)
    at = member.offset_data + fp.tell() + 2 * 7  # little-endian uint16: the low byte
    data[at] ^= 0x01
    shard.write_bytes(bytes(data))


@pytest.mark.slow
def test_sigterm_saves_resume_is_bitwise_and_damaged_checkpoints_are_refused(
    small_dataset, tmp_path, train_main
):
    data, runs = Path(small_dataset), tmp_path / "runs"
    steps = [
        "run.train_steps=24",
        "run.log_interval=1",
        "run.eval_interval=0",
        "data.num_workers=2",
    ]
    # Stopped by SIGTERM to the launcher once training runs (loader workers started).
    a = Launch(*run_args(data, runs, "resumed", *steps))
    a.wait_for(r"step +2/24")
    a.signal(signal.SIGTERM)
    assert a.finish() == 0, a.text()
    ckpts = sorted((runs / "resumed" / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and 2 <= int(ckpts[0].name[5:]) < 24, a.text()
    stopped = ckpts[0]
    assert "received SIGTERM" in "".join(a.out)
    # The console of this ZeRO-3 run holds our lines only.
    assert third_party_lines(a.text()) == [], a.text()
    # Damaged copies of that checkpoint, each refused before any process group.
    cases = {
        "model file": "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "optimizer shard": "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rank file": "rank_00001.pt",
    }
    for what, name in cases.items():
        damaged = tmp_path / "damaged" / what.replace(" ", "_") / stopped.name
        shutil.copytree(stopped, damaged)
        (damaged / name).unlink()
        new = f"branch_{what.replace(' ', '_')}"
        rc, out, err = train_main(*run_args(data, runs, new, f"run.resume={damaged}"), world=2)
        assert_one_error_line(rc, err, name, "missing")
        assert not (runs / new).exists(), what
    rc, out, err = train_main(
        *run_args(data, runs, "wider", f"run.resume={stopped}", "model.d_model=96"), world=2
    )
    assert_one_error_line(rc, err, "d_model", str(stopped))
    assert not (runs / "wider").exists()

    # Resumed to the end, and a reference run without the stop: the same bits.
    b = Launch(*run_args(data, runs, "resumed", *steps, "run.resume=auto"))
    assert b.finish() == 0, b.text()
    c = Launch(*run_args(data, runs, "straight", *steps))
    assert c.finish() == 0, c.text()
    resumed = checkpoint_tensors(runs / "resumed" / "checkpoints" / "step_00000024")
    straight = checkpoint_tensors(runs / "straight" / "checkpoints" / "step_00000024")
    assert resumed.keys() == straight.keys() and len(resumed) > 10
    for key, t in straight.items():
        assert torch.equal(resumed[key], t), key
    # Negative control: the stopped checkpoint's weights differ from the final ones, so the
    # comparison above can tell checkpoints apart.
    early = checkpoint_tensors(stopped)
    assert any(not torch.equal(early[k], straight[k]) for k in straight if k in early)


@pytest.mark.slow
def test_sigint_during_start_up_stops_after_one_step_and_saves(small_dataset, tmp_path):
    """Ctrl-C before the ranks train: the launcher passes it on once each rank can take it,
    the ranks stop at the first step boundary with a checkpoint, and everything exits 0."""
    runs = tmp_path / "runs"
    launch = Launch(*run_args(Path(small_dataset), runs, "early", "data.num_workers=2"))
    launch.wait_for_process("launch.agent")
    assert not any("start-up:" in line for line in launch.out)  # no rank trains yet
    launch.signal(signal.SIGINT)
    assert launch.finish() == 0, launch.text()
    assert (runs / "early" / "checkpoints" / "step_00000001" / "COMPLETE").is_file()
    assert "stopped at step 1: received SIGINT" in "".join(launch.out), launch.text()


@pytest.mark.slow
def test_second_sigint_stops_everything_at_once(small_dataset, tmp_path):
    runs = tmp_path / "runs"
    launch = Launch(
        *run_args(Path(small_dataset), runs, "twice", "data.num_workers=2", "run.log_interval=1"),
        "run.train_steps=100000",
    )
    launch.wait_for(r"step +2/")
    launch.signal(signal.SIGINT)
    time.sleep(0.2)
    launch.signal(signal.SIGINT)
    assert launch.finish(timeout=60) == 128 + signal.SIGINT, launch.text()


@pytest.mark.slow
def test_sigterm_to_torchrun_itself_saves_and_exits_0(small_dataset, tmp_path):
    """Slurm, or a user who runs the generated torchrun command without pretrain-launch,
    signals torchrun itself (launch.agent): every rank saves, torchrun exits 0, no traceback,
    no process left. Plain `torch.distributed.run` exits 1 with a traceback here."""
    from launch.torchrun import Topology, torchrun_command

    runs = tmp_path / "runs"
    args = run_args(Path(small_dataset), runs, "direct", "data.num_workers=2", "run.log_interval=1")
    cmd = torchrun_command(TINY, [*args, "run.train_steps=100000"], Topology(nproc_per_node=2))
    launch = Launch(cmd=cmd)
    launch.wait_for(r"step +2/")
    launch.signal(signal.SIGTERM)
    assert launch.finish() == 0, launch.text()
    assert "Traceback" not in launch.text(), launch.text()
    ckpts = sorted((runs / "direct" / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").is_file(), launch.text()
    assert f"stopped at step {int(ckpts[0].name[5:])}: received SIGTERM" in "".join(launch.out)


# Run with `python -c`: an object whose __del__ runs while the interpreter shuts down, after
# Python has put its signal handlers back to the default, marks that it ran and sends this
# process SIGUSR1, a late copy of the stop signal.
LATE_SIGNAL = """
import os, runpy, signal, sys
class Late:
    def __del__(self, os=os, pid=os.getpid(), sig=signal.SIGUSR1):
        os.close(os.open({mark!r}, os.O_CREAT | os.O_WRONLY))
        os.kill(pid, sig)
late = Late()
"""


@pytest.mark.slow
def test_a_late_stop_signal_cannot_change_the_exit_code(small_dataset, tmp_path):
    """A copy of the stop signal that reaches a rank while its interpreter shuts down (Slurm
    signals every process of the job step; the agent and the job script pass it on too) leaves
    the exit code alone: 0 after a finished run, so a preempted Slurm job is requeued. Control:
    the same run through main() without the entry point around it dies of the signal."""
    entries = {
        "python -m pretrain.train": "runpy.run_module('pretrain.train', run_name='__main__')",
        "main() only": "from pretrain.train import main; sys.exit(main())",
    }
    codes = {}
    for i, (name, call) in enumerate(entries.items()):
        mark = tmp_path / f"late-signal-sent-{i}"
        args = run_args(Path(small_dataset), tmp_path / "runs", f"late{i}", "run.train_steps=6")
        proc = subprocess.run(
            [sys.executable, "-c", LATE_SIGNAL.format(mark=str(mark)) + call, TINY, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert mark.exists(), proc.stderr  # the late signal was sent
        assert "trained 6 steps" in proc.stdout, proc.stdout + proc.stderr  # a finished run
        codes[name] = proc.returncode
    assert codes == {"python -m pretrain.train": 0, "main() only": -signal.SIGUSR1}, codes


@pytest.mark.slow
def test_corrupt_shard_with_ids_in_range_is_one_error(small_dataset, tmp_path):
    """A flipped bit that keeps every id in range: the checksum on first read catches it, in
    a loader worker; one line, exit 2, no run folder, no process left."""
    data, runs = tmp_path / "flipped", tmp_path / "runs"
    shutil.copytree(small_dataset, data)
    for shard in sorted((data / "train").glob("*.tar")):
        _flip_in_range(shard)
    launch = Launch(*run_args(data, runs, "flipped", "data.num_workers=2"))
    rc = launch.finish()
    line = assert_one_error_line(
        rc, "".join(launch.err), "train-", "corrupt", "pretrain-data verify"
    )
    assert "crc32" in line  # the range reader's chunk checksum (data_pipeline.range_reads)
    assert not (runs / "flipped").exists(), launch.text()
