"""The training loop: one `train_step` per optimizer step, everything else in hooks.

Hooks (progress printing, MLflow, evaluation, checkpointing, preemption) see the trainer after
each step and at the end; none of them is a branch in the loop. The loop stops when the run is
done or a hook asks it to (`trainer.stop_reason`), and every rank agrees on stopping before it
happens, since a rank that leaves alone would hang the others in the next collective.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from pretrain import checkpoint
from pretrain.config import Config
from pretrain.distributed import Layout, rng_state, seed_all, set_rng_state
from pretrain.models.rng import model_rng, seed_model_rng
from pretrain.reliability import (
    Faults,
    PeerFailure,
    StepGuard,
    Watchdog,
    is_peer_failure,
    kill_stopped,
    set_collective_timeout,
)
from pretrain.steps import add_loss_tokens, runner_for
from pretrain.tracking import Tracker, step_metrics


@dataclass
class TrainState:
    """What a resume needs beyond the engine: saved in every checkpoint."""

    step: int = 0
    consumed_tokens: int = 0
    mlflow_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "consumed_tokens": self.consumed_tokens,
            "mlflow_run_id": self.mlflow_run_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.consumed_tokens = int(state["consumed_tokens"])
        self.mlflow_run_id = state.get("mlflow_run_id")


class Batches(Protocol):
    """What the trainer needs of a loader (data_pipeline.loader.DistributedBatches is one)."""

    global_batch: int  # sequences per optimizer step over all data-parallel ranks

    @property
    def tokens_per_sequence(self) -> int: ...  # encoder plus decoder tokens for T5

    def next_step(self) -> list[dict[str, torch.Tensor]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Hook(Protocol):
    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def at_end(self, trainer: Trainer) -> None: ...


HISTORY_STEPS = 1000


@dataclass
class Trainer:
    cfg: Config
    layout: Layout
    engine: Any
    scheduler: Any
    train_data: Batches
    val_data: Batches | None
    tracker: Tracker
    state: TrainState = field(default_factory=TrainState)
    hooks: list[Any] = field(default_factory=list)
    stop_reason: str | None = None
    resharded: list[str] = field(default_factory=list)  # what load() bridged ('tp 2 -> 1')
    rng_restored: bool = False  # whether load() restored this rank's saved RNG streams
    fault: str | None = None  # why a fault stopped the run (then the exit status is not 0)
    peers: dict[int, int] = field(default_factory=dict)  # this host's other ranks: {rank: pid}
    # The metrics of the latest HISTORY_STEPS steps (tests and benchmarks read them): bounded,
    # so a long run does not grow it on every rank forever; no hook needs more than the last.
    history: deque[dict[str, float]] = field(default_factory=lambda: deque(maxlen=HISTORY_STEPS))

    def __post_init__(self) -> None:
        # How a step and an evaluation run is the engine kind's business (pretrain.steps).
        self.runner = runner_for(self.engine, self.layout, self.cfg.model.family)
        self.guard = StepGuard(self.cfg.reliability, self.layout)
        self.faults = Faults(self.cfg.reliability.inject, self.layout.rank)

    @property
    def ckpt_dir(self) -> Path:
        return self.cfg.checkpoint_dir

    @property
    def tokens_per_step(self) -> int:
        """Tokens the model processes per optimizer step: encoder plus decoder for T5."""
        return self.train_data.global_batch * self.train_data.tokens_per_sequence

    # --- the step -------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns the step's metrics. The
        loss is token-weighted over the whole step (pretrain.steps)."""
        if not self.engine.module.training:  # after an evaluation or a sample; the call walks
            self.engine.train()  # every module (86 us per step on the char config, measured)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        step = self.state.step + 1
        self.faults.before_step(step)
        self._ask_stop_hooks()  # stop requests that must be agreed in this step's collective
        before = {"data": self.train_data.state_dict(), "rng": self._rng_state()}
        guard = self.guard
        guard.reset()

        def decide(loss_sum: torch.Tensor, n_micro: int, norm: float | None) -> tuple[bool, float]:
            return guard.agree(step, self.stop_reason is not None, loss_sum, n_micro, norm)

        micro = self.train_data.next_step()
        add_loss_tokens(micro, self.layout)
        with self.faults.in_forward(self.engine.module, step):
            loss, norm = self.runner.train(micro, decide)
        if not guard.decided:  # a runner without the hook: agree after the update
            decide(torch.tensor(loss * len(micro)), len(micro), norm)
        guard.after_update(step, self.engine.was_step_applied(), norm)
        if guard.stop and self.stop_reason is None:
            # A signal sent to the whole job reaches the ranks moments apart: one that arrived
            # here after this step's check is still this rank's own reason (rank 0 prints it).
            self._ask_stop_hooks()
            self.stop_reason = self.stop_reason or "another rank asked to stop"
        metrics = {"loss": loss, "lr": lr, "grad_norm": norm, "skipped": float(guard.skip)}
        if guard.reason and self.layout.is_main:
            print(f"step {step}: {guard.reason}", flush=True)
        if guard.halt and guard.nonfinite and self.cfg.reliability.nonfinite == "stop":
            # The state of the step before: the update was discarded; rewind data and RNG.
            self.train_data.load_state_dict(before["data"])
            self._set_rng_state(before["rng"])
            self.fault = guard.reason
            self.stop_reason = guard.reason
            return metrics
        self.state.step = step
        self.state.consumed_tokens += self.tokens_per_step
        if guard.halt:
            self.fault = self.stop_reason = guard.reason
        elif guard.rollback:
            self._roll_back(step)
        return metrics

    def _ask_stop_hooks(self) -> None:
        """Let the hooks that can stop a run (signals, exit_after_*) set stop_reason."""
        for hook in self.hooks:
            getattr(hook, "before_update", lambda trainer: None)(self)

    def _rng_state(self) -> dict[str, Any]:
        return {"rng": rng_state(), "model_rng": model_rng(self.engine.module).state_dict()}

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        set_rng_state(state["rng"])
        model_rng(self.engine.module).load_state_dict(state["model_rng"])

    def _roll_back(self, step: int) -> None:
        """Back to the newest checkpoint of this run, with the data position kept where it is
        now: past the batches that led to the spike. No checkpoint yet: the step stays
        skipped."""
        path = checkpoint.head(self.ckpt_dir)
        if path is None:
            return
        consumed = self.train_data.state_dict()
        self.load(path)
        self.train_data.load_state_dict(consumed)
        if self.layout.is_main:
            print(
                f"step {step}: rolled back to {path} (step {self.state.step}); the data "
                f"continues at sequence {consumed['consumed']}",
                flush=True,
            )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss per scored token over the first `run.eval_batches` global batches of the
        validation split, the same batches at every evaluation so values are comparable across
        steps."""
        if self.val_data is None or self.cfg.run.eval_batches == 0:
            return {}
        self.engine.eval()
        self.val_data.load_state_dict({**self.val_data.state_dict(), "consumed": 0})
        loss_sum = tokens = 0.0
        for _ in range(self.cfg.run.eval_batches):
            micro = self.val_data.next_step()
            n = add_loss_tokens(micro, self.layout)
            loss_sum += self.runner.eval(micro) * n
            tokens += n
        val_loss = loss_sum / max(tokens, 1.0)
        self.engine.train()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    # --- checkpoints ----------------------------------------------------------------------

    def save(self) -> Path:
        """Save under the start-up limits (collective timeout and watchdog): a checkpoint of a
        large model takes longer than a step."""
        rel, watchdog = self.cfg.reliability, getattr(self, "watchdog", None)
        set_collective_timeout(rel.startup_timeout_s)
        if watchdog is not None:
            limit, phase = watchdog.limit, watchdog.phase
            watchdog.arm(rel.startup_timeout_s, self.state.step, "a checkpoint save")
        try:
            return self._save()
        finally:
            set_collective_timeout(rel.collective_timeout_s)
            if watchdog is not None:
                watchdog.arm(limit, self.state.step, phase)

    def _save(self) -> Path:
        client = {
            "trainer": self.state.state_dict(),
            "data": self.train_data.state_dict(),
            "config": self.cfg.to_dict(),
        }
        return checkpoint.save(
            self.engine,
            self.layout,
            self.ckpt_dir,
            self.state.step,
            client,
            # The model-parallel generator advances per rank like the default ones: without
            # its state a resumed run would redraw the attention dropout masks of step 0.
            {"rng": rng_state(), "model_rng": model_rng(self.engine.module).state_dict()},
            self.cfg.checkpoint.keep_last,
            self.cfg.checkpoint.keep_every,
            # What check_compatible compares before the next resume's process group exists.
            {"model": checkpoint.model_shape(self.cfg), "precision": self.cfg.run.precision},
        )

    def load(self, path: Path) -> None:
        exclude = self.cfg.checkpoint.exclude_from_loading
        meta = json.loads((path / checkpoint.COMPLETE).read_text())
        self.resharded = checkpoint.layout_change(meta, self.cfg, self.layout.dp_size)
        client, rank_state = checkpoint.load(self.engine, self.layout, path, exclude, self.cfg)
        self.state.load_state_dict(client["trainer"])
        self._apply_optim_config()
        if "data" not in exclude:
            self.train_data.load_state_dict(client["data"])
        if "rng" not in exclude and rank_state is not None:
            self.rng_restored = True
            set_rng_state(rank_state["rng"])
            if "model_rng" in rank_state:  # absent from checkpoints of older versions
                model_rng(self.engine.module).load_state_dict(rank_state["model_rng"])
        elif self.resharded:
            # The saved per-rank streams belong to the old layout's ranks; fresh streams that
            # differ per rank and from step 0's (whose masks they would otherwise replay).
            seed = self.cfg.run.seed + 7919 * (self.state.step + 1)
            L = self.layout
            seed_all(seed + 1000 * L.dp_rank + 100 * L.pp_rank + 1)
            seed_model_rng(self.engine.module, seed, L.dp_rank, L.pp_rank, L.tp_rank)

    def _apply_optim_config(self) -> None:
        """The config wins over the checkpoint for optimizer settings (Megatron's
        --override-opt_param-scheduler): DeepSpeed restores the saved AdamW hyperparameters and
        the schedule's base rate, so without this a resumed run would silently ignore a changed
        optim.lr, betas, eps or weight_decay. Unchanged values give the same numbers."""
        o = self.cfg.optim
        sched = self.scheduler
        sched.base_lrs = [o.lr for _ in sched.base_lrs]
        opt = self.engine.optimizer  # DeepSpeed's wrapper; bf16's keeps the groups inside
        groups = opt.param_groups if hasattr(opt, "param_groups") else opt.optimizer.param_groups
        for i, group in enumerate(groups):
            group["betas"], group["eps"] = (o.beta1, o.beta2), o.eps
            # Groups come from pretrain.optim.param_groups, each marked 'decay' (a mixture of
            # experts adds expert groups after the first two); checkpoints from before the mark
            # hold [decayed, not decayed].
            group["weight_decay"] = o.weight_decay if group.get("decay", i == 0) else 0.0
            group["initial_lr"] = o.lr
            # The kernel as configured now, not as saved (torch restores the saved flags).
            group["foreach"] = True if o.implementation == "foreach" else None
            group["fused"] = True if o.implementation == "fused" else None
        for group, base, fn in zip(groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * fn(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in groups]

    # --- the loop -------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason

    def fit(self) -> None:
        """Steps until the run is done or every rank agreed to stop (the stop request travels
        in the step's one collective, pretrain.reliability.StepGuard). A failed collective (a
        dead or hung peer) ends this rank with PeerFailure, naming the rank and step."""
        rel = self.cfg.reliability
        self.watchdog = watchdog = Watchdog(self.layout.rank, self.peers)
        set_collective_timeout(rel.startup_timeout_s)
        # The first step builds and warms up: it gets the start-up limits.
        watchdog.arm(rel.startup_timeout_s, self.state.step, "the first step")
        watchdog.start()
        warm = False
        try:
            while self.state.step < self.cfg.run.train_steps:
                before = self.state.step
                metrics = self.train_step()
                if not warm:  # start-up is over: the per-step limits from now on
                    set_collective_timeout(rel.collective_timeout_s)
                    warm = True
                watchdog.arm(rel.step_timeout_s, self.state.step, "a training step")
                self.history.append(metrics)
                # A step stopped before its update, or rolled back, is not reported or saved.
                if self.state.step > before:
                    for hook in self.hooks:
                        hook.after_step(self, metrics)
                if self.guard.stop or self.fault:
                    break
            set_collective_timeout(rel.startup_timeout_s)  # the final save and evaluation
            watchdog.arm(rel.startup_timeout_s, self.state.step, "the final save")
            for hook in self.hooks:
                hook.at_end(self)
        except RuntimeError as e:
            if not is_peer_failure(e):
                raise
            killed = kill_stopped(self.peers)
            raise PeerFailure(
                f"rank {self.layout.rank}: a collective failed after step {self.state.step} "
                f"(a rank died, or hung past reliability.collective_timeout_s="
                f"{rel.collective_timeout_s:g}): {str(e).splitlines()[0][:200]}"
                + (f"; killed stopped ranks {killed}" if killed else "")
                + "; resume with run.resume=auto"
            ) from e
        finally:
            watchdog.close()


# --- hooks ---------------------------------------------------------------------------------


class ProgressHook:
    """A progress line every `run.log_interval` steps on rank 0: loss, lr, tokens/s and ETA."""

    def __init__(self, printer=print):
        self.print = printer
        self.t_last = time.perf_counter()
        self.step_last: int | None = None
        self.first_step: int | None = None
        self.t_first = self.t_last

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        step, cfg = trainer.state.step, trainer.cfg
        now = time.perf_counter()
        if self.step_last is None:  # the first step of a launch pays warm-up costs
            self.step_last, self.first_step, self.t_last, self.t_first = step, step, now, now
            return
        if step % cfg.run.log_interval and step != cfg.run.train_steps:
            return
        steps = step - self.step_last
        step_time = (now - self.t_last) / max(steps, 1)
        tok_s = trainer.tokens_per_step / step_time
        eta = (cfg.run.train_steps - step) * (now - self.t_first) / max(step - self.first_step, 1)
        metrics.update(tokens_per_s=tok_s, step_time=step_time)
        self.step_last, self.t_last = step, now
        if trainer.layout.is_main:
            self.print(
                f"step {step:>6}/{cfg.run.train_steps} | loss {metrics['loss']:.4f} | "
                f"lr {metrics['lr']:.2e} | grad {metrics['grad_norm']:.3f} | "
                f"{tok_s:,.0f} tok/s | ETA {_hms(eta)}",
                flush=True,
            )

    def at_end(self, trainer: Trainer) -> None:
        pass


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class TrackingHook:
    """Train metrics to MLflow on log steps (after ProgressHook adds throughput): every numeric
    entry of the step's metrics (so a hook or runner that adds one, e.g. MoE statistics, gets it
    tracked), tokens seen, this process's peak memory, and whatever the model reports through a
    `tracking_metrics() -> dict[str, float]` method. Also hands a new MLflow run's id, once the
    store has made it, to the train state, so the next checkpoint carries it."""

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.tracker.run_id is not None:
            trainer.state.mlflow_run_id = trainer.tracker.run_id
        step = trainer.state.step
        if step % trainer.cfg.run.log_interval == 0 or step == trainer.cfg.run.train_steps:
            trainer.tracker.log(step_metrics(trainer, metrics), step)

    def at_end(self, trainer: Trainer) -> None:
        pass


class EvalHook:
    """Validation loss and perplexity every `run.eval_interval` steps and at the end."""

    def __init__(self, printer=print):
        self.print = printer
        self.last: dict[str, float] = {}
        self.last_step = -1

    def run(self, trainer: Trainer) -> None:
        if self.last_step == trainer.state.step:
            return
        self.last = trainer.evaluate()
        self.last_step = trainer.state.step
        if self.last:
            trainer.tracker.log(self.last, trainer.state.step)
            if trainer.layout.is_main:
                self.print(
                    f"step {trainer.state.step:>6} | val loss {self.last['val_loss']:.4f}"
                    f" | val ppl {self.last['val_ppl']:.2f}",
                    flush=True,
                )

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        every = trainer.cfg.run.eval_interval
        if every and trainer.state.step % every == 0:
            self.run(trainer)

    def at_end(self, trainer: Trainer) -> None:
        if trainer.state.step >= trainer.cfg.run.train_steps:
            self.run(trainer)


class CheckpointHook:
    """Save every `checkpoint.interval` steps, and at the end or on a requested stop."""

    def __init__(self, printer=print):
        self.print = printer
        self.saved_step = -1
        self.last_path: Path | None = None

    def save(self, trainer: Trainer) -> None:
        if self.saved_step == trainer.state.step:
            return
        t0 = time.perf_counter()
        self.last_path = trainer.save()
        self.saved_step = trainer.state.step
        if trainer.layout.is_main:
            self.print(
                f"saved checkpoint {self.last_path} ({time.perf_counter() - t0:.1f} s)", flush=True
            )

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        every = trainer.cfg.checkpoint.interval
        if every and trainer.state.step % every == 0:
            self.save(trainer)

    def at_end(self, trainer: Trainer) -> None:
        self.save(trainer)


class ExitHook:
    """Preemption and time limits: stop cleanly (the checkpoint hook then saves) after
    `run.exit_after_steps` steps or `run.exit_after_minutes` of this launch, or on SIGTERM or
    SIGUSR1 (what Slurm sends before a time limit or preemption), or on the first Ctrl-C
    (SIGINT); a second Ctrl-C interrupts at once without saving."""

    def __init__(self, start_step: int):
        self.start_step = start_step
        self.t0 = time.monotonic()
        self.signalled: str | None = None
        # The process's own handlers come back at the end of the run (at_end).
        self.previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
        }

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def before_update(self, trainer: Trainer) -> None:
        """Asked in each step before its collective, for the step about to complete, so every
        rank stops after that very step (pretrain.reliability.StepGuard carries the flag)."""
        self._check(trainer, trainer.state.step + 1)

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._check(trainer, trainer.state.step)  # agreed in the next step's collective

    def _check(self, trainer: Trainer, step: int) -> None:
        run = trainer.cfg.run
        if self.signalled:
            trainer.request_stop(f"received {self.signalled}")
        if run.exit_after_steps and step - self.start_step >= run.exit_after_steps:
            trainer.request_stop(f"run.exit_after_steps={run.exit_after_steps} reached")
        if run.exit_after_minutes and time.monotonic() - self.t0 >= 60 * run.exit_after_minutes:
            trainer.request_stop(f"run.exit_after_minutes={run.exit_after_minutes} reached")

    def at_end(self, trainer: Trainer) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
