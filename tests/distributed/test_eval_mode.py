"""An evaluation leaves training as it was: with dropout on, a run that evaluates every 2 steps
trains bitwise like one that never evaluates (evaluation runs the model in eval mode and
draws nothing from the training RNG; the next step must be back in train mode, or dropout
would be off from then on). One process, tiny GPT, 6 steps."""

from __future__ import annotations

import re

import launching
import pytest

pytestmark = pytest.mark.slow

COMMON = [
    "run.train_steps=6",
    "checkpoint.interval=0",
    "run.log_interval=1",
    "run.sample_tokens=0",
    "run.eval_batches=2",
    "model.dropout=0.1",
    "optim.warmup_steps=2",
    "tracking.enabled=false",
]


def test_evaluations_leave_the_training_losses_unchanged(tmp_path, small_dataset):
    losses = {}
    for name, every in (("never", 0), ("every2", 2)):
        run = launching.launch_dumping(
            tmp_path, name, small_dataset, f"run.eval_interval={every}", *COMMON
        )
        losses[name] = run["losses"]
        log = (tmp_path / f"{name}.log").read_text()
        # The evaluations in the loop (the run's end evaluates either way).
        assert (re.search(r"step +2 \| val loss", log) is not None) == (every > 0)
    assert len(losses["never"]) == 6
    assert losses["every2"] == losses["never"]  # exact float equality
