"""When a sweep point is done: its live checkpoint is its final step and the training process
that got there exited cleanly, shown by a marker file in the run directory. The local runner
writes the marker itself; a Slurm array task writes it with `python -m pretrain.scaling.done
CONFIG` after training exits 0 (launch.slurm SlurmOptions.on_success), so a second
`pretrain-sweep run --slurm` skips the point. Imports no torch: runs on login and compute nodes.
"""

from __future__ import annotations

import sys
from pathlib import Path

DONE_FILE = "sweep-point-done"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"  # pretrain.checkpoint.tag_for, without importing torch here


def at_final_step(run_dir: Path, steps: int) -> bool:
    """The run's live checkpoint is `steps` (the trainer saves it at the end)."""
    ckpt = run_dir / "checkpoints"
    latest = ckpt / "latest"
    if not latest.is_file():
        return False
    tag = latest.read_text().strip()
    return tag == tag_for(steps) and (ckpt / tag / "COMPLETE").is_file()


def mark_if_final(run_dir: Path, steps: int) -> bool:
    """Write the marker when the run is at its final step; whether it did. Called only after
    the training process exited 0: a process killed after its last save may not have closed
    its MLflow run."""
    if not at_final_step(run_dir, steps):
        return False
    (run_dir / DONE_FILE).write_text("")
    return True


def main(argv: list[str] | None = None) -> int:
    from pretrain.config import ConfigError, load_config

    args = sys.argv[1:] if argv is None else argv
    try:
        cfg = load_config(args[0], [a for a in args[1:] if "=" in a])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = cfg.run.run_dir.absolute()
    if mark_if_final(run_dir, cfg.run.train_steps):
        print(f"sweep point done: {run_dir / DONE_FILE}")
        return 0
    print(f"not marked done: {run_dir} has no complete checkpoint at step {cfg.run.train_steps}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
