"""`pretrain-launch CONFIG [overrides] --nproc-per-node N`: check the config, then run torchrun,
or with `--slurm` write a batch script into the run directory and submit it with sbatch.

`--dry-run` prints the command (or the batch script) instead of running it. With `--slurm`,
several configs make one job array: `pretrain-launch a.yaml b.yaml c.yaml --slurm`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launch import slurm, supervise
from launch.torchrun import Topology, check_data, check_topology, render, torchrun_command
from pretrain.config import ConfigError, load_config

EPILOG = """examples:
  pretrain-launch configs/tiny.yaml --nproc-per-node 2
  pretrain-launch configs/tiny.yaml run.train_steps=100 optim.lr=1e-3 --nproc-per-node 4
  pretrain-launch configs/demo.yaml --nnodes 2 --node-rank 0 --master-addr 10.0.0.1
  pretrain-launch configs/demo.yaml --slurm --nnodes 4 --gpus-per-node 8 --time 24:00:00

stopping: Ctrl-C, SIGTERM or SIGUSR1 to pretrain-launch makes every rank save at the next step
and stop (exit 0; continue with run.resume=auto); a second Ctrl-C stops everything at once,
without saving (exit 130). Bad input is one `error:` line and exit 2.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain-launch",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="the run's YAML config, e.g. configs/tiny.yaml")
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. run.train_steps=100 model.n_layers=4; with --slurm, more "
        "config files (one job array task each)",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="ranks (processes) per node, e.g. 8 for 8 GPUs (default 1; with --slurm, "
        "--gpus-per-node or 1)",
    )
    p.add_argument(
        "--nnodes",
        "--nodes",
        type=int,
        default=1,
        dest="nnodes",
        metavar="N",
        help="machines in the run, e.g. --nnodes 2 (default 1); start the launcher on each",
    )
    p.add_argument(
        "--node-rank",
        type=int,
        default=0,
        metavar="I",
        help="this machine's index in [0, nnodes), e.g. --node-rank 1 on the second (default 0)",
    )
    p.add_argument(
        "--master-addr",
        default="127.0.0.1",
        metavar="HOST",
        help="the first node's address, the same on every node, e.g. 10.0.0.1",
    )
    p.add_argument(
        "--master-port",
        type=int,
        default=29500,
        metavar="PORT",
        help="rendezvous port on the first node, e.g. 29500 (the default)",
    )
    p.add_argument(
        "--rdzv-id",
        default=None,
        metavar="ID",
        help="rendezvous id shared by a job's nodes, e.g. job42 (default: the run name)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the torchrun command (or the sbatch script) instead of running it",
    )
    s = p.add_argument_group("Slurm (with --slurm)")
    s.add_argument("--slurm", action="store_true", help="write an sbatch script and submit it")
    s.add_argument(
        "--gpus-per-node", type=int, default=0, metavar="N", help="GPUs per node, e.g. 8"
    )
    s.add_argument(
        "--cpus-per-node", type=int, default=None, metavar="N", help="CPU cores per node, e.g. 64"
    )
    examples = {
        "partition": "gpu",
        "account": "myproject",
        "qos": "high",
        "time": "24:00:00",
        "constraint": "a100",
        "mail-user": "me@example.org",
        "mail-type": "END,FAIL",
    }
    for name, example in examples.items():
        s.add_argument(f"--{name}", default=None, help=f"sbatch --{name}, e.g. --{name} {example}")
    s.add_argument(
        "--job-name",
        default=None,
        help="sbatch job name, e.g. --job-name lr-sweep (default: the run name)",
    )
    s.add_argument("--exclusive", action="store_true", help="whole nodes (sbatch --exclusive)")
    s.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="DIRECTIVE",
        help="an extra #SBATCH directive, repeatable, e.g. --sbatch=--reservation=big",
    )
    s.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment on every node, repeatable, e.g. --env NCCL_DEBUG=WARN",
    )
    s.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="a shell line run before srun, repeatable, e.g. --setup 'module load cuda'",
    )
    s.add_argument(
        "--srun-args",
        default="",
        metavar="ARGS",
        help="extra srun options, e.g. --srun-args '--container-image=pytorch.sqsh'",
    )
    s.add_argument(
        "--signal-lead",
        type=int,
        default=120,
        metavar="S",
        help="seconds between the preemption warning (USR1) and the time limit, to save, "
        "e.g. --signal-lead 300 (default 120)",
    )
    s.add_argument(
        "--no-requeue", action="store_true", help="do not requeue the job after a preemption"
    )
    s.add_argument(
        "--max-restarts",
        type=int,
        default=20,
        metavar="N",
        help="requeues before giving up, e.g. 5 (default 20)",
    )
    s.add_argument(
        "--array-limit",
        type=int,
        default=None,
        metavar="N",
        help="array tasks running at once (several configs), e.g. 4",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # once torchrun runs, Ctrl-C is the supervisor's (no exception)
        print("pretrain-launch: interrupted before the ranks started", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
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
    try:
        # Built once here, before any rank starts (rank 0 checks again; then it is a no-op).
        from pretrain.tracking_store import prepare_store

        note = prepare_store(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if note:
        print(note, flush=True)
    # One compute thread per rank unless the user chose otherwise: ranks share the cores.
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    return supervise.run(cmd, env=env)


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
