"""`python -m launch.tracking_store CONFIG [overrides]`: create the run's MLflow store and
experiment if they are missing. A job array's batch script runs it under `flock` before training,
because tasks starting together would otherwise race to create one SQLite store (seen: "table
_alembic_tmp_params already exists", every task failed). Runs on the compute node; launch.cli
never imports it, so the login node needs no mlflow import."""

from __future__ import annotations

import sys

from pretrain.config import load_config


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg = load_config(args[0], [a for a in args[1:] if "=" in a])
    if cfg.tracking.enabled:
        from pretrain.tracking import ensure_experiment, tracking_uri

        ensure_experiment(cfg, tracking_uri(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
