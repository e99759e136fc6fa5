"""`pretrain-launch CONFIG [overrides] --nproc-per-node N`: check the config, then run torchrun.

`--dry-run` prints the command instead of running it (to paste into a job script).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from launch.torchrun import Topology, check_data, check_topology, render, torchrun_command
from pretrain.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pretrain-launch", description=__doc__)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.train_steps=100")
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    args = p.parse_intermixed_args(argv)
    topo = Topology(
        args.nnodes, args.nproc_per_node, args.node_rank, args.master_addr, args.master_port
    )
    try:
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
        cfg = load_config(args.config, args.overrides)
        check_topology(cfg, topo)
        if not args.dry_run:  # a command written for another machine may name its data
            check_data(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = torchrun_command(args.config, args.overrides, topo)
    if args.dry_run:
        print(render(cmd))
        return 0
    # One compute thread per rank unless the user chose otherwise: ranks share the cores.
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
