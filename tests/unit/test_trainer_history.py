"""Trainer.history keeps the latest HISTORY_STEPS steps' metrics, not one entry per step forever
(issue 16), and the hooks still see each step's metrics as its newest entry. The loop is the real
Trainer.fit; the step, the engine and the collective timeouts are stand-ins (no training)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from pretrain import trainer as T
from pretrain.config import load_config
from pretrain.distributed import Layout

REPO = Path(__file__).resolve().parents[2]
STEPS = T.HISTORY_STEPS + 37


class CountingTrainer(T.Trainer):
    def train_step(self) -> dict[str, float]:
        self.state.step += 1
        return {"step": float(self.state.step)}


class Watchdog:  # no thread, no deadline: the loop's bookkeeping is what is tested
    def __init__(self, *args):
        pass

    def start(self):
        pass

    def arm(self, *args):
        pass

    def close(self):
        pass


class SeeHistory:
    def __init__(self):
        self.seen: list[tuple[float, float, int]] = []

    def after_step(self, trainer, metrics):
        self.seen.append((metrics["step"], trainer.history[-1]["step"], len(trainer.history)))

    def at_end(self, trainer):
        pass


def test_history_is_bounded_and_hooks_see_the_latest_step(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(T, "Watchdog", Watchdog)
    monkeypatch.setattr(T, "set_collective_timeout", lambda seconds: None)
    monkeypatch.setattr(T, "runner_for", lambda engine, layout, family: None)
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [f"run.train_steps={STEPS}", f"run.output_dir={tmp_path}"],
        1,
    )
    layout = Layout(0, 1, 0, torch.device("cpu"), 0, 1, 0, 1, 0, 1, 1, None, None)
    hook = SeeHistory()
    trainer = CountingTrainer(cfg, layout, SimpleNamespace(), None, None, None, None, hooks=[hook])
    trainer.fit()

    assert trainer.state.step == STEPS
    assert len(trainer.history) == T.HISTORY_STEPS
    # The newest HISTORY_STEPS steps, oldest first: the first 37 were let go.
    assert [m["step"] for m in trainer.history] == list(range(38, STEPS + 1))
    # Every step's hook saw that step's metrics as the newest entry, the length capped.
    assert [s[0] for s in hook.seen] == list(range(1, STEPS + 1))
    assert all(mine == newest for mine, newest, _ in hook.seen)
    assert [n for *_, n in hook.seen] == [min(s, T.HISTORY_STEPS) for s in range(1, STEPS + 1)]
