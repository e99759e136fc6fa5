"""`pretrain-sweep plan|run|fit SPEC`: a scaling-law sweep from its spec to fitted laws.

plan  prints the grid: every point's N, D, steps, FLOPs, where its run starts and an estimated
      time (spec `throughput`: achieved FLOP/s per process).
run   trains the unfinished points, sequentially here, or with --slurm as job arrays.
fit   reads the finished runs from MLflow, fits Kaplan's L(N) and L(D), Chinchilla approaches 2
      and 3 with bootstrap intervals, the compute-optimal N and D for --budget, writes
      fit.json and PNG plots into <sweep dir>/fit and logs them to the sweep's parent run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pretrain.config import ConfigError

if TYPE_CHECKING:  # spec imports torch (pretrain.optim): not for --help
    from pretrain.scaling.spec import Spec

SWEEP_EXAMPLES = {
    "plan": "example:\n  pretrain-sweep plan configs/sweeps/tiny.yaml",
    "run": "examples:\n"
    "  pretrain-sweep run configs/sweeps/tiny.yaml\n"
    "  pretrain-sweep run configs/sweeps/tiny.yaml run.log_interval=50 --output-dir /scratch/sw\n"
    "  pretrain-sweep run configs/sweeps/tiny.yaml --slurm --partition gpu --gpus-per-node 8 "
    "--time 4:00:00 --dry-run",
    "fit": "examples:\n"
    "  pretrain-sweep fit configs/sweeps/tiny.yaml --budget 1e18\n"
    "  pretrain-sweep fit configs/sweeps/tiny.yaml --bootstrap 0 --metric loss",
}
SWEEP_HELP = {
    "plan": "print the grid and its estimated time; trains nothing",
    "run": "train the unfinished points, here one after another or with --slurm as job arrays",
    "fit": "fit the scaling laws to the finished runs, write fit.json and plots",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain-sweep",
        description=__doc__,
        epilog="examples:\n" + "\n".join(text.splitlines()[1] for text in SWEEP_EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("plan", "run", "fit"):
        s = sub.add_parser(
            name,
            help=SWEEP_HELP[name],
            description=SWEEP_HELP[name],
            epilog=SWEEP_EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        s.add_argument(
            "spec", help="the sweep spec YAML, e.g. configs/sweeps/tiny.yaml (see configs/sweeps/)"
        )
        s.add_argument(
            "overrides",
            nargs="*",
            help="dotted overrides of the spec's base config, e.g. run.log_interval=50",
        )
        s.add_argument(
            "--output-dir",
            default=None,
            metavar="DIR",
            help="replaces the spec's output_dir, e.g. --output-dir /scratch/sweeps",
        )
        if name == "run":
            s.add_argument(
                "--slurm",
                action="store_true",
                help="submit Slurm job arrays (launch.slurm) instead of training here",
            )
            s.add_argument(
                "--dry-run",
                action="store_true",
                help="with --slurm: print the batch scripts instead of submitting them",
            )
            examples = {"partition": "gpu", "account": "myproject", "qos": "high"}
            for opt, example in examples.items():
                s.add_argument(
                    f"--{opt}",
                    default=None,
                    help=f"with --slurm: sbatch --{opt}, e.g. --{opt} {example}",
                )
            s.add_argument(
                "--time",
                default=None,
                help="with --slurm: each array task's time limit, e.g. --time 4:00:00",
            )
            s.add_argument(
                "--gpus-per-node",
                type=int,
                default=0,
                metavar="N",
                help="with --slurm: GPUs per node, e.g. 8 (default 0: CPU nodes)",
            )
            s.add_argument(
                "--array-limit",
                type=int,
                default=None,
                metavar="N",
                help="with --slurm: array tasks running at once, e.g. 4 (default: no limit)",
            )
            s.add_argument(
                "--setup",
                action="append",
                default=[],
                metavar="LINE",
                help="with --slurm: a shell line before srun, repeatable, "
                "e.g. --setup 'module load cuda'",
            )
            s.add_argument(
                "--env",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="with --slurm: environment on every node, repeatable, "
                "e.g. --env NCCL_DEBUG=WARN",
            )
        if name == "fit":
            s.add_argument(
                "--budget",
                type=float,
                default=None,
                metavar="FLOPS",
                help="training FLOPs to give the compute-optimal N and D for, e.g. --budget 1e18",
            )
            s.add_argument(
                "--bootstrap",
                type=int,
                default=200,
                metavar="N",
                help="bootstrap resamples for the intervals, e.g. --bootstrap 1000 "
                "(default 200; 0: none)",
            )
            s.add_argument(
                "--metric",
                default="val_loss",
                help="the MLflow metric fitted, e.g. --metric loss (default val_loss)",
            )
    return p


def _vocab(base_overrides_spec: Path, overrides: list[str]) -> int | None:
    """The dataset tokenizer's size, when the base config's dataset is present."""
    import yaml

    from pretrain.config import apply_overrides

    raw = yaml.safe_load(base_overrides_spec.read_text()) or {}
    spec_dir = base_overrides_spec.parent
    base = spec_dir / raw.get("base", "")
    if not base.is_file():
        return None
    data = apply_overrides(
        yaml.safe_load(base.read_text()) or {}, list(raw.get("overrides", [])) + overrides
    )
    path = (data.get("data") or {}).get("path")
    blend = (data.get("data") or {}).get("blend") or []
    from data_pipeline.blend import open_datasets
    from data_pipeline.errors import DataError

    try:
        return open_datasets(path or "data/stdlib", blend)[0][1].vocab_size
    except (DataError, OSError):  # no dataset here: counts without embeddings still work
        return None


def plan_table(spec: Spec) -> str:
    from pretrain.scaling.runner import is_done, order

    rows = [("point", "N", "D tokens", "steps", "FLOPs C", "starts from", "est. time", "status")]
    total = 0.0
    for pt in order(spec):
        frac = pt.trained_steps / pt.steps
        seconds = pt.C * frac / (spec.throughput * spec.nproc)
        total += seconds
        src = f"{pt.branch_of}@{pt.branch_step}" if pt.branch_of else "scratch"
        rows.append(
            (
                pt.id,
                f"{pt.N:.3g}",
                f"{pt.D:.3g}",
                str(pt.steps),
                f"{pt.C:.3g}",
                src,
                _hms(seconds),
                "done" if is_done(spec, pt) else "todo",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append(
        f"{len(spec.points)} points, {spec.schedule} schedule, N "
        f"{'with' if spec.embeddings else 'without'} embeddings; estimated {_hms(total)} at "
        f"{spec.throughput:.3g} FLOP/s per process x {spec.nproc}; sweep dir {spec.sweep_dir}"
    )
    return "\n".join(lines)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def fit(spec: Spec, budget: float | None, samples: int, metric: str, say=print) -> dict:
    from mlflow.tracking import MlflowClient

    from pretrain.scaling import fits, plots
    from pretrain.scaling.results import read_observations
    from pretrain.scaling.runner import PARENT_FILE, point_cfg
    from pretrain.tracking import tracking_uri

    parent_file = spec.sweep_dir / PARENT_FILE
    if not parent_file.is_file():
        raise ConfigError(
            "sweep",
            spec.name,
            f"no runs yet ({parent_file} is missing); run `pretrain-sweep run` first",
        )
    parent = parent_file.read_text().strip()
    uri = tracking_uri(point_cfg(spec, spec.points[0], parent))
    obs = read_observations(uri, parent, metric)
    if len(obs) < 6:
        raise ConfigError(
            "sweep",
            spec.name,
            f"{len(obs)} finished runs in MLflow; the L(N, D) "
            "fit needs at least 6 (5 parameters): run the rest first",
        )
    fit3 = fits.approach3(obs)
    predicted = fit3([o.N for o in obs], [o.D for o in obs])
    r2 = fits.r_squared([o.loss for o in obs], predicted)
    fit2 = fits.approach2(obs)
    kap = fits.kaplan(obs)
    budget = budget or max(o.C for o in obs)
    # FLOPs per parameter per token of the sweep's own count (6 when C = 6ND; more with the
    # attention term), for approach 3's closed-form optimum under C = k N D.
    k = float(np.median([o.C / (o.N * o.D) for o in obs]))
    result: dict = {
        "sweep": spec.name,
        "parent_run_id": parent,
        "metric": metric,
        "runs": len(obs),
        "approach3": {**fit3.params(), "a": fit3.a, "r2": r2},
        "kaplan": {k: (vars(v) if v else None) for k, v in kap.items()},
        "approach2": (
            {
                "a": fit2.a,
                "kN": fit2.kN,
                "b": fit2.b,
                "kD": fit2.kD,
                "minima": [
                    {"C": m.C, "N_opt": m.N_opt, "D_opt": m.D_opt, "loss": m.loss}
                    for m in fit2.minima
                ],
            }
            if fit2
            else None
        ),
        "budget": budget,
        "flops_per_param_token": k,
        "optimal": {"approach3": dict(zip(("N", "D"), fit3.optimal(budget, k), strict=True))},
        "observations": [vars(o) for o in obs],
    }
    if fit2:
        result["optimal"]["approach2"] = dict(zip(("N", "D"), fit2.optimal(budget), strict=True))
    if samples:
        ci = fits.bootstrap(obs, fit3, samples=samples, budget_C=budget, flops_per_param_token=k)
        result["bootstrap"] = {"samples": samples, "level": 0.95, "intervals": ci}
    out = spec.sweep_dir / "fit"
    out.mkdir(parents=True, exist_ok=True)
    files = [
        plots.loss_vs_compute(obs, fit3, out / "loss_vs_compute.png", k),
        plots.isoflop_profiles(obs, fit2, out / "isoflop_profiles.png"),
        plots.fit_vs_observed(obs, fit3, r2, out / "fit_vs_observed.png"),
    ]
    (out / "fit.json").write_text(json.dumps(result, indent=2))
    files.append(out / "fit.json")
    client = MlflowClient(uri)
    for f in files:
        client.log_artifact(parent, str(f), artifact_path="fit")
    for key, v in {**fit3.params(), "r2": r2}.items():
        client.log_metric(parent, f"fit.{key}", float(v))
    say(
        f"{len(obs)} runs; L(N, D) = {fit3.E:.3f} + {fit3.A:.4g}/N^{fit3.alpha:.3f} + "
        f"{fit3.B:.4g}/D^{fit3.beta:.3f}, R^2 = {r2:.4f}"
    )
    for name, law in kap.items():
        if law:
            say(f"Kaplan {name} = ({law.x_c:.4g} / x)^{law.alpha:.4f}")
    if fit2:
        say(f"approach 2: N_opt ~ C^{fit2.a:.3f}, D_opt ~ C^{fit2.b:.3f}")
    for name, nd in result["optimal"].items():
        say(f"compute-optimal at C={budget:.3g} ({name}): N={nd['N']:.4g}, D={nd['D']:.4g}")
    say(f"wrote {out}; logged to MLflow run {parent}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pretrain.scaling.spec import load_spec

    try:
        spec = load_spec(
            args.spec, args.overrides, _vocab(Path(args.spec), args.overrides), args.output_dir
        )
        if args.command == "plan":
            print(plan_table(spec))
            return 0
        if args.command == "run":
            from pretrain.scaling import runner

            if not args.slurm:
                return runner.run_local(spec)
            from launch.slurm import SlurmOptions

            opts = SlurmOptions(
                nproc_per_node=spec.nproc,
                gpus_per_node=args.gpus_per_node,
                partition=args.partition,
                account=args.account,
                qos=args.qos,
                time=args.time,
                array_limit=args.array_limit,
                setup=args.setup,
                env=args.env,
            )
            return runner.submit_slurm(spec, opts, args.dry_run)
        fit(spec, args.budget, args.bootstrap, args.metric)
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
