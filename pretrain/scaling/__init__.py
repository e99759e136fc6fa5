"""Scaling-law sweeps: a spec (spec.py), its grid of runs (plan.py), running them
(runner.py), reading them back from MLflow and fitting laws (results.py, fits.py), plots
(plots.py), and the `pretrain-sweep` command (cli.py). docs/scaling-laws.md."""
