"""`python -m launch.tracking_store CONFIG [overrides]`: create (or migrate) the run's MLflow
store and experiment if they are missing, atomically (pretrain.tracking_store). A job array's
batch script runs it before training, because tasks starting together would otherwise race to
create one SQLite store (seen: "table _alembic_tmp_params already exists", every task failed).
Runs on the compute node; launch.cli's Slurm path never imports it, so the login node needs no
mlflow import (its local path calls prepare_store itself, before torchrun)."""

from __future__ import annotations

import sys

from pretrain.config import load_config


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg = load_config(args[0], [a for a in args[1:] if "=" in a])
    from pretrain.tracking_store import prepare_store

    note = prepare_store(cfg)  # built atomically under its own lock: see that module
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
