"""`pretrain-launch CONFIG [overrides] --nproc-per-node N`: check the config, then run torchrun,
or with `--slurm` write a batch script into the run directory and submit it with sbatch.

`--dry-run` prints the command (or the batch script) instead of running it. With `--slurm`,
several configs make one job array: `pretrain-launch a.yaml b.yaml c.yaml --slurm`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from launch import slurm
from launch.torchrun import Topology, check_data, check_topology, render, torchrun_command
from pretrain.config import ConfigError, load_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain-launch", description=__doc__)
    p.add_argument("config")
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. run.train_steps=100; with --slurm, more config files",
    )
    p.add_argument("--nproc-per-node", type=int, default=None, help="ranks per node")
    p.add_argument("--nnodes", "--nodes", type=int, default=1, dest="nnodes")
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1", help="the first node's address")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--rdzv-id", default=None, help="rendezvous id (default: the run name)")
    p.add_argument("--dry-run", action="store_true", help="print, do not run or submit")
    s = p.add_argument_group("Slurm (with --slurm)")
    s.add_argument("--slurm", action="store_true", help="write an sbatch script and submit it")
    s.add_argument("--gpus-per-node", type=int, default=0)
    s.add_argument("--cpus-per-node", type=int, default=None)
    for name in ("partition", "account", "qos", "time", "constraint", "mail-user", "mail-type"):
        s.add_argument(f"--{name}", default=None)
    s.add_argument("--job-name", default=None)
    s.add_argument("--exclusive", action="store_true")
    s.add_argument("--sbatch", action="append", default=[], help="an extra #SBATCH directive")
    s.add_argument("--env", action="append", default=[], help="KEY=VALUE on every node")
    s.add_argument("--setup", action="append", default=[], help="a shell line before srun")
    s.add_argument("--srun-args", default="", help="e.g. container options for srun")
    s.add_argument("--signal-lead", type=int, default=120, help="seconds of warning to save")
    s.add_argument("--no-requeue", action="store_true")
    s.add_argument("--max-restarts", type=int, default=20)
    s.add_argument("--array-limit", type=int, default=None, help="concurrent array tasks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    configs = [args.config] + [o for o in args.overrides if "=" not in o]
    overrides = [o for o in args.overrides if "=" in o]
    if args.slurm:
        return main_slurm(args, configs, overrides)
    nproc = 1 if args.nproc_per_node is None else args.nproc_per_node
    try:
        if len(configs) > 1:
            raise ConfigError(
                "overrides",
                configs[1],
                "write overrides as key=value; several configs need --slurm",
            )
        cfg = load_config(args.config, overrides)
        topo = Topology(
            args.nnodes,
            nproc,
            args.node_rank,
            args.master_addr,
            args.master_port,
            args.rdzv_id or cfg.run.name,
        )
        if topo.nproc_per_node < 1 or topo.nnodes < 1:
            raise ConfigError(
                "--nproc-per-node/--nnodes",
                (topo.nproc_per_node, topo.nnodes),
                "use positive process and node counts",
            )
        if not 0 <= topo.node_rank < topo.nnodes:
            raise ConfigError(
                "--node-rank",
                topo.node_rank,
                f"use a rank in [0, {topo.nnodes - 1}] for --nnodes {topo.nnodes}",
            )
        check_topology(cfg, topo)
        if not args.dry_run:  # a command written for another machine may name its data
            check_data(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = torchrun_command(args.config, overrides, topo)
    if args.dry_run:
        print(render(cmd))
        return 0
    # One compute thread per rank unless the user chose otherwise: ranks share the cores.
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    return subprocess.call(cmd, env=env)


def slurm_options(args: argparse.Namespace) -> slurm.SlurmOptions:
    return slurm.SlurmOptions(
        nodes=args.nnodes,
        nproc_per_node=(
            max(args.gpus_per_node, 1) if args.nproc_per_node is None else args.nproc_per_node
        ),
        gpus_per_node=args.gpus_per_node,
        cpus_per_node=args.cpus_per_node,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        time=args.time,
        constraint=args.constraint,
        exclusive=args.exclusive,
        mail_user=args.mail_user,
        mail_type=args.mail_type,
        job_name=args.job_name,
        extra=args.sbatch,
        env=args.env,
        setup=args.setup,
        srun_args=args.srun_args,
        signal_lead=args.signal_lead,
        requeue=not args.no_requeue,
        max_restarts=args.max_restarts,
        array_limit=args.array_limit,
    )


def main_slurm(args: argparse.Namespace, configs: list[str], overrides: list[str]) -> int:
    """Validate everything, write the script, submit it (or print it with --dry-run)."""
    opts = slurm_options(args)
    try:
        runs = slurm.load_runs(configs, overrides)
        slurm.validate(runs, opts)
        if not args.dry_run:
            for run in runs:
                check_data(run.cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = slurm.render_script(runs, opts, Path.cwd())
    if args.dry_run:
        print(text, end="")
        return 0
    path = slurm.script_path(runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    for log_dir in slurm.log_dirs(runs):  # sbatch opens --output before the script runs
        log_dir.mkdir(parents=True, exist_ok=True)
    try:
        job = slurm.submit(path)
    except (RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"submitted job {job}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
