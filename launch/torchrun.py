"""torchrun command lines built from a run config. Imports no torch: runs on login nodes."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.blend_spec import parse_blend_entry
from pretrain.config import Config, ConfigError


@dataclass(frozen=True)
class Topology:
    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"  # the first node: it hosts the c10d rendezvous store
    master_port: int = 29500
    rdzv_id: str = "pretrain"  # the same on every node of one job, different between jobs

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def torchrun_command(
    config_path: str, overrides: list[str], topo: Topology, python: str = sys.executable
) -> list[str]:
    """The argv that starts this node's ranks of a training run: torchrun through
    launch.agent, so a stop signal sent to it saves and exits 0."""
    cmd = [python, "-m", "launch.agent", f"--nproc-per-node={topo.nproc_per_node}"]
    if topo.nnodes == 1:
        cmd.append("--standalone")  # a private rendezvous on a free local port
    else:
        cmd += multi_node_args(
            topo.nnodes,
            str(topo.node_rank),
            topo.master_addr,
            str(topo.master_port),
            topo.rdzv_id,
            is_host=str(int(topo.node_rank == 0)),
        )
    return cmd + ["-m", "pretrain.train", config_path, *overrides]


def multi_node_args(
    nnodes: int, node_rank: str, host: str, port: str, rdzv_id: str, is_host: str
) -> list[str]:
    """torchrun's options for one node of many: a c10d rendezvous whose store lives on the first
    node. The arguments are strings so the Slurm script can pass shell variables ($SLURM_NODEID).

    is_host is explicit because torchrun otherwise guesses it from the host name, and every
    "node" guesses yes when several share one machine (tests, or two jobs on one node)."""
    return [
        f"--nnodes={nnodes}",
        f"--node-rank={node_rank}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={host}:{port}",
        f"--rdzv-id={rdzv_id}",
        f"--rdzv-conf=is_host={is_host}",
    ]


def check_topology(cfg: Config, topo: Topology) -> None:
    """Raise ConfigError now if the world size does not fit the parallel layout, rather than
    after every node has imported torch."""
    cfg.parallel.layout(topo.world_size)


def render(cmd: list[str]) -> str:
    return shlex.join(cmd)


def check_data(cfg: Config) -> None:
    """A missing dataset, found before any rank starts (a file check, no torch)."""
    blend = getattr(cfg.data, "blend", None) or []
    paths = [parse_blend_entry(entry)[1] for entry in blend] or [cfg.data.path]
    for path in paths:
        if not (Path(path) / "dataset.json").is_file():
            raise ConfigError(
                "data.path",
                path,
                f"no dataset there; build one with `pretrain-data build --out {path} ...`",
            )
