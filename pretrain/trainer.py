"""The training loop: one `train_step` per optimizer step, everything else in hooks.

Hooks (progress printing, MLflow, evaluation, checkpointing, preemption) see the trainer after
each step and at the end; none of them is a branch in the loop. The loop stops when the run is
done or a hook asks it to (`trainer.stop_reason`), and every rank agrees on stopping before it
happens, since a rank that leaves alone would hang the others in the next collective.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from pretrain import checkpoint
from pretrain.config import Config
from pretrain.distributed import Layout, rng_state, set_rng_state
from pretrain.models.rng import model_rng
from pretrain.steps import add_loss_tokens, runner_for
from pretrain.tracking import Tracker


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
    history: list[dict[str, float]] = field(default_factory=list)  # metrics of each step

    def __post_init__(self) -> None:
        # How a step and an evaluation run is the engine kind's business (pretrain.steps).
        self.runner = runner_for(self.engine, self.layout, self.cfg.model.family)

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
        self.engine.train()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        micro = self.train_data.next_step()
        add_loss_tokens(micro, self.layout)
        loss, norm = self.runner.train(micro)
        self.state.step += 1
        self.state.consumed_tokens += self.tokens_per_step
        return {"loss": loss, "lr": lr, "grad_norm": norm}

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
        client, rank_state = checkpoint.load(self.engine, self.layout, path, exclude)
        self.state.load_state_dict(client["trainer"])
        self._apply_optim_config()
        if "data" not in exclude:
            self.train_data.load_state_dict(client["data"])
        if "rng" not in exclude and rank_state is not None:
            set_rng_state(rank_state["rng"])
            if "model_rng" in rank_state:  # absent from checkpoints of older versions
                model_rng(self.engine.module).load_state_dict(rank_state["model_rng"])

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
            # Groups come from pretrain.optim.param_groups: [decayed, not decayed].
            group["weight_decay"] = o.weight_decay if i == 0 else 0.0
            group["initial_lr"] = o.lr
        for group, base, fn in zip(groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * fn(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in groups]

    # --- the loop -------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason

    def _all_agree_to_stop(self) -> bool:
        flag = torch.tensor(1.0 if self.stop_reason else 0.0, device=self.layout.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.stop_reason is None:
            self.stop_reason = "another rank asked to stop"
        return flag.item() > 0

    def fit(self) -> None:
        while self.state.step < self.cfg.run.train_steps:
            metrics = self.train_step()
            self.history.append(metrics)
            for hook in self.hooks:
                hook.after_step(self, metrics)
            if self._all_agree_to_stop():
                break
        for hook in self.hooks:
            hook.at_end(self)


# --- hooks ---------------------------------------------------------------------------------


class NaNGuard:
    """Stop at once, without saving, when the loss stops being finite."""

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(
                f"loss is {metrics['loss']} at step {trainer.state.step}; lower optim.lr, raise "
                f"optim.warmup_steps or check the data; resume from the last checkpoint with "
                f"run.resume=auto"
            )

    def at_end(self, trainer: Trainer) -> None:
        pass


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
    """Train metrics to MLflow on log steps (after ProgressHook adds throughput)."""

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        step = trainer.state.step
        if step % trainer.cfg.run.log_interval == 0 or step == trainer.cfg.run.train_steps:
            trainer.tracker.log({k: float(v) for k, v in metrics.items()}, step)

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
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        run = trainer.cfg.run
        if self.signalled:
            trainer.request_stop(f"received {self.signalled}")
        if run.exit_after_steps and trainer.state.step - self.start_step >= run.exit_after_steps:
            trainer.request_stop(f"run.exit_after_steps={run.exit_after_steps} reached")
        if run.exit_after_minutes and time.monotonic() - self.t0 >= 60 * run.exit_after_minutes:
            trainer.request_stop(f"run.exit_after_minutes={run.exit_after_minutes} reached")

    def at_end(self, trainer: Trainer) -> None:
        pass
