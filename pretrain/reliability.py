"""Faults every rank handles together: non-finite steps, loss spikes, hangs and lost peers.

One small all-reduce per training step (`StepGuard.agree`), taken after the step's last backward
and before its optimizer update, carries each rank's stop request (signals, time limits) and its
non-finite and spike flags; every rank then acts on the same sums, so all of them skip, stop or
roll back in the same step. A discarded update goes through DeepSpeed's own overflow path
(`discarded_update`): weights, optimizer state and the learning-rate schedule stay as they were,
DeepSpeed counts a skipped step, and the micro-step counters move on as after any step.

Hangs: collective timeouts from the config (`set_collective_timeout`, longer for start-up and
checkpoints) and a watchdog thread (`Watchdog`) that ends this process, naming its rank and step,
when no step completes in time. A collective that fails because a peer died or timed out is
turned into `PeerFailure` (one line naming the rank and step); before leaving, a rank kills the
peers of its own host that are stopped (SIGSTOP), which nothing else would ever end.

`Faults` is the test-only injection of `reliability.inject`.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pretrain.config import ReliabilityConfig

# --- discarding an update -------------------------------------------------------------------


@contextlib.contextmanager
def discarded_update(engine: Any):
    """Within: `engine.step()` at the accumulation boundary discards the step's gradients.

    DeepSpeed's ZeRO and bf16 optimizers skip an update whose gradient norm is not finite
    (clearing their gradient buffers, setting `overflow`); the engine then counts a skipped step
    and leaves the schedule alone. Their norm function is made to report NaN here, so that very
    path runs also when the gradients are finite (a spike, or a fault on another rank). A plain
    torch optimizer (fp32, ZeRO-0) has no such path: its step is replaced by one that only sets
    `overflow`, and the engine zeroes the gradients as after any step."""
    opt = engine.optimizer
    nan = torch.tensor(float("nan"))
    patches: dict[str, Any] = {}
    if hasattr(opt, "scaled_global_norm"):  # ZeRO 1-2
        patches["scaled_global_norm"] = lambda *a, **k: nan.clone()
        patches["check_grad_overflow"] = True  # bf16 ZeRO-2 checks only when asked to
    elif hasattr(opt, "_get_norm_groups"):  # ZeRO-3
        patches["_get_norm_groups"] = lambda *a, **k: [nan.clone()]
    elif hasattr(opt, "get_grads_for_norm"):  # BF16_Optimizer (bf16 at ZeRO-1)
        patches["get_grads_for_norm"] = lambda *a, **k: ([nan.clone()], {})
    else:

        def skip(closure=None):
            opt.overflow = True

        patches["step"] = skip
    saved = {k: opt.__dict__[k] for k in patches if k in opt.__dict__}
    opt.__dict__.update(patches)
    try:
        yield
    finally:
        for k in patches:
            if k in saved:
                opt.__dict__[k] = saved[k]
            else:
                opt.__dict__.pop(k, None)
        if "step" in patches:
            opt.__dict__.pop("overflow", None)
    if engine.was_step_applied():  # the weights moved: a DeepSpeed change this relies on
        raise RuntimeError(
            f"DeepSpeed applied an update meant to be discarded ({type(opt).__name__}); "
            f"pretrain.reliability.discarded_update needs updating for this DeepSpeed version"
        )


# --- spikes -----------------------------------------------------------------------------------


class SpikeDetector:
    """A value above mean + sigma * std of the last `window` values (population std); silent
    until the window is full."""

    def __init__(self, sigma: float, window: int):
        self.sigma = sigma
        self.values: deque[float] = deque(maxlen=window)

    def threshold(self) -> float | None:
        if len(self.values) < (self.values.maxlen or 0):
            return None
        n = len(self.values)
        mean = sum(self.values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / n)
        return mean + self.sigma * std

    def is_spike(self, value: float | None) -> bool:
        limit = self.threshold()
        return value is not None and limit is not None and value > limit

    def add(self, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            self.values.append(value)


# --- the per-step agreement -------------------------------------------------------------------


class StepGuard:
    """Decides, with every other rank, what becomes of each step (see the module docstring).

    The verdict's fields after `agree`: `stop` (some rank asked to stop), `nonfinite`, `spike`,
    `skip` (the update is discarded), `rollback` and `halt` (stop because of a fault: the
    trainer saves the last good state and ends with a non-zero exit status)."""

    def __init__(self, cfg: ReliabilityConfig, layout: Any, printer=print):
        self.cfg, self.layout, self.print = cfg, layout, printer
        self.losses = SpikeDetector(cfg.spike_sigma, cfg.spike_window)
        self.norms = SpikeDetector(cfg.spike_sigma, cfg.spike_window)
        self.skips_in_row = 0
        self.first_skip: int | None = None
        self.reset()

    def reset(self) -> None:
        self.stop = self.nonfinite = self.spike = False
        self.skip = self.rollback = self.halt = False
        self.reason: str | None = None
        self.decided = False

    def agree(
        self, step: int, stop_wanted: bool, loss_sum: torch.Tensor, n_micro: int, norm
    ) -> tuple[bool, float]:
        """The step's one collective: (whether to discard the update, the step's loss averaged
        over the data-parallel ranks). The loss rides in the same all-reduce as the flags: the
        world sum of the loss sums of tensor-parallel rank 0 (every TP rank holds the same
        loss; a pipeline's earlier stages pass 0) is the data-parallel group's sum, in float32
        as a separate all-reduce over that group computed it."""
        local_sum = float(loss_sum.item())
        loss = local_sum / n_micro  # this rank's own loss, before any averaging
        bad = not math.isfinite(loss) or (norm is not None and not math.isfinite(norm))
        spike = (
            self.cfg.spike_action != "off"
            and not bad
            and (self.losses.is_spike(loss) or self.norms.is_spike(norm))
        )
        share = local_sum if self.layout.tp_rank == 0 else 0.0
        flags = torch.tensor(
            [float(stop_wanted), float(bad), float(spike), share], device=self.layout.device
        )
        if self.layout.world_size > 1:  # over one rank the all-reduce is the identity
            dist.all_reduce(flags)
        *verdict, loss_total = flags.tolist()
        mean_loss = loss_total / (n_micro * self.layout.dp_size)
        stop, nonfinite, spike_any = (bool(v > 0) for v in verdict)
        self.stop, self.nonfinite, self.decided = stop, nonfinite, True
        self.spike = spike_any and not nonfinite
        if not nonfinite and not self.spike:
            self.losses.add(loss)
            self.norms.add(norm)
        if nonfinite:
            self.skip = True
            self.halt = self.cfg.nonfinite == "stop"
            what = "a non-finite loss or gradient norm"
            self.reason = f"{what} at step {step}"
        elif self.spike:
            self.skip = self.cfg.spike_action in ("skip", "rollback")
            self.rollback = self.cfg.spike_action == "rollback"
            limit = self.losses.threshold()
            self.reason = (
                f"loss spike at step {step} (this rank: loss {loss:.4f}, "
                f"limit {limit if limit is not None else float('nan'):.4f}; "
                f"grad norm {norm if norm is not None else float('nan'):.4g})"
            )
        if self.skip and not self.halt:
            self.skips_in_row += 1
            self.first_skip = self.first_skip or step
            if self.skips_in_row >= self.cfg.max_consecutive_skips:
                self.halt = True
                self.reason = (
                    f"{self.skips_in_row} consecutive steps skipped (steps {self.first_skip}-"
                    f"{step}; last: {self.reason}): the weights are those of step "
                    f"{self.first_skip - 1}. Lower optim.lr or raise optim.warmup_steps, check "
                    f"the data at these steps, or raise reliability.max_consecutive_skips; then "
                    f"continue with run.resume=auto"
                )
        elif not self.skip:
            self.skips_in_row, self.first_skip = 0, None
        if self.halt and self.nonfinite and self.cfg.nonfinite == "stop":
            self.reason = (
                f"{self.reason}: the update was not applied and the state of step {step - 1} is "
                f"saved. Lower optim.lr or raise optim.warmup_steps, check the data, or set "
                f"reliability.nonfinite=skip; then continue with run.resume=auto"
            )
        return self.skip, mean_loss

    def after_update(self, step: int, engine_applied: bool, norm: float | None) -> None:
        """Where DeepSpeed computes the norm inside the update, a non-finite one made it skip
        the update on every rank alike (the norm is global): count it as a skip. A spike in that
        norm can only be logged or rolled back."""
        if self.skip or engine_applied:
            if not self.skip and self.cfg.spike_action != "off" and self.norms.is_spike(norm):
                self.spike, self.rollback = True, self.cfg.spike_action == "rollback"
                self.reason = f"gradient-norm spike at step {step} (norm {norm:.4g})"
            return
        self.nonfinite, self.skip = True, True
        self.reason = f"a non-finite gradient norm at step {step}"
        self.halt = self.cfg.nonfinite == "stop"
        self.skips_in_row += 1
        self.first_skip = self.first_skip or step
        if self.skips_in_row >= self.cfg.max_consecutive_skips:
            self.halt = True


# --- faults for tests -------------------------------------------------------------------------


class Faults:
    """TEST ONLY (`reliability.inject`): 'KIND@STEP[:RANK]' entries for this rank."""

    SIGNALS = {"sigterm": signal.SIGTERM, "sigusr1": signal.SIGUSR1, "sigint": signal.SIGINT}
    # Kinds that act inside the step's forward pass (in_forward), not before the step.
    # late-sigterm: SIGTERM after the step's own stop check, as when a signal sent to the
    # whole job reaches this rank a moment after its peers.
    IN_FORWARD = ("nan", "spike", "late-sigterm")

    def __init__(self, entries: list[str], rank: int):
        self.at: dict[int, list[str]] = {}
        for entry in entries:
            kind, _, where = entry.partition("@")
            step, _, who = where.partition(":")
            if int(who or 0) == rank:
                self.at.setdefault(int(step), []).append(kind)

    def before_step(self, step: int) -> None:
        """Each entry fires once: a step number met again after a rollback finds it gone."""
        kinds = self.at.get(step, [])
        fired = [k for k in kinds if k not in self.IN_FORWARD]
        self.at[step] = [k for k in kinds if k in self.IN_FORWARD]
        for kind in fired:
            # The time on the system-wide monotonic clock: tests measure how fast the job ends.
            print(
                f"reliability.inject: {kind} at step {step}, monotonic {time.monotonic():.3f}",
                file=sys.stderr,
                flush=True,
            )
            if kind in self.SIGNALS:
                os.kill(os.getpid(), self.SIGNALS[kind])
            elif kind == "sigstop":
                os.kill(os.getpid(), signal.SIGSTOP)
            elif kind == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "hang":
                while True:
                    time.sleep(1)
            elif kind == "error":  # an exception out of the training loop (a bug, a bad batch)
                raise RuntimeError(f"reliability.inject: error at step {step}")

    @contextlib.contextmanager
    def in_forward(self, module: torch.nn.Module, step: int):
        """A NaN or 100x loss on this rank's micro-batches of `step`: the backward then carries
        it into the gradients, as a real fault would. Or SIGTERM to this rank once its first
        micro-batch's forward is done (late-sigterm)."""
        kinds = self.at.pop(step, [])
        loss_fault = "nan" if "nan" in kinds else "spike" if "spike" in kinds else None
        handles = []
        if loss_fault is not None:
            factor = float("nan") if loss_fault == "nan" else 100.0
            print(f"reliability.inject: {loss_fault} at step {step}", file=sys.stderr, flush=True)
            handles.append(module.register_forward_hook(lambda m, args, out: out * factor))
        if "late-sigterm" in kinds:
            print(f"reliability.inject: late-sigterm at step {step}", file=sys.stderr, flush=True)

            sent: list[bool] = []

            def late(m: torch.nn.Module, args: Any, out: Any) -> None:
                if not sent:  # once, after the first micro-batch's forward
                    sent.append(True)
                    os.kill(os.getpid(), signal.SIGTERM)

            handles.append(module.register_forward_hook(late))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


# --- hangs and lost peers ---------------------------------------------------------------------


class PeerFailure(RuntimeError):
    """A collective failed: a peer died, or did not answer within the collective timeout."""


def is_peer_failure(exc: BaseException) -> bool:
    """Whether an exception is a failed collective (gloo and NCCL raise RuntimeError or
    DistError with transport messages), not a bug in a step."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    marks = ("gloo", "Connection reset", "Connection closed", "Timed out", "NCCL", "timed out")
    return isinstance(exc, RuntimeError) and any(m in text for m in marks)


def set_collective_timeout(seconds: float) -> None:
    """Apply a timeout to every process group of this process (the world, megatron's and
    DeepSpeed's groups). torch documents no public setter; `_set_pg_timeout` is its own."""
    from torch.distributed import distributed_c10d as c10d

    for group in list(c10d._world.pg_map):
        with contextlib.suppress(ValueError, RuntimeError):
            c10d._set_pg_timeout(timedelta(seconds=seconds), group)


def peers_of_host(layout: Any) -> dict[int, int]:
    """{rank: pid} of the ranks on this host (one collective, at start-up)."""
    mine = (socket.gethostname(), os.getpid())
    everyone: list[Any] = [None] * layout.world_size
    dist.all_gather_object(everyone, mine)
    here = mine[0]
    return {r: pid for r, (host, pid) in enumerate(everyone) if host == here and r != layout.rank}


def kill_stopped(peers: dict[int, int]) -> list[int]:
    """SIGKILL the peers of this host that are stopped (state T): a stopped process ignores
    every other signal, so the launcher's SIGTERM would wait on it forever."""
    killed = []
    for rank, pid in peers.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields and fields[0] in ("T", "t"):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed.append(rank)
    return killed


class Watchdog:
    """A daemon thread that ends the process when the deadline passes without `beat`. Exits
    with status 124 (as `timeout` does) after one line on stderr naming the rank and step."""

    EXIT = 124

    def __init__(self, rank: int, peers: dict[int, int] | None = None):
        self.rank, self.peers = rank, peers or {}
        self.deadline = math.inf
        self.limit = math.inf
        self.step = 0
        self.phase = "start-up"
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def arm(self, seconds: float | None, step: int, phase: str) -> None:
        self.step, self.phase = step, phase
        self.limit = math.inf if seconds is None else seconds
        self.deadline = time.monotonic() + self.limit

    def close(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(0.5):
            if time.monotonic() > self.deadline:
                killed = kill_stopped(self.peers)
                print(
                    f"error: rank {self.rank}: watchdog: no training step completed within "
                    f"{self.limit:g} s (after step {self.step}, during {self.phase}); ending the "
                    f"job"
                    + (f" (killed stopped ranks {killed})" if killed else "")
                    + "; raise reliability.step_timeout_s if steps are this slow, else look for "
                    "a hung or stopped rank; resume with run.resume=auto",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(self.EXIT)
