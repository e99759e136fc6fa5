"""Slurm batch scripts generated from run configs. Imports no torch: runs on login nodes.

One job runs one training run on `nodes` nodes: `srun` starts one torchrun agent per node, the
agents meet in a c10d rendezvous on the first node of the allocation, and each starts
`nproc_per_node` ranks. A job array runs several configs (a sweep), one run directory each.

Preemption and time limits: Slurm sends USR1 to the batch shell `signal_lead` seconds early
(`--signal=B:USR1@lead`); the script forwards it to every rank, the ranks save at the next step
boundary and exit 0, and the script requeues the job, which resumes from the latest checkpoint.
A failure without that signal (a crash, a config error) ends the job without a requeue.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from launch.torchrun import Topology, check_topology, multi_node_args
from pretrain.config import Config, ConfigError, load_config

# Keys that define what a run computes: a run directory whose config.yaml differs in any of
# these belongs to another run, and resuming there would mix two runs' checkpoints. Everything
# else (train_steps, intervals, tracking, checkpoint cadence) may change between launches.
IDENTITY_SECTIONS = ("model", "data", "optim")
IDENTITY_RUN_KEYS = ("seed",)

# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME_FORMS = [
    (re.compile(r"^(\d+)$"), ("m",)),
    (re.compile(r"^(\d+):(\d+)$"), ("m", "s")),
    (re.compile(r"^(\d+):(\d+):(\d+)$"), ("h", "m", "s")),
    (re.compile(r"^(\d+)-(\d+)$"), ("d", "h")),
    (re.compile(r"^(\d+)-(\d+):(\d+)$"), ("d", "h", "m")),
    (re.compile(r"^(\d+)-(\d+):(\d+):(\d+)$"), ("d", "h", "m", "s")),
]
_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def time_seconds(text: str) -> int:
    """Seconds in a Slurm time limit; ConfigError naming the accepted forms otherwise."""
    for pattern, units in _TIME_FORMS:
        m = pattern.match(text.strip())
        if m:
            return sum(int(v) * _SECONDS[u] for v, u in zip(m.groups(), units, strict=True))
    raise ConfigError(
        "--time",
        text,
        "use a Slurm time limit: MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS or "
        "DAYS-HOURS[:MINUTES[:SECONDS]], e.g. 2:00:00 or 1-12:00:00",
    )


@dataclass
class SlurmOptions:
    nodes: int = 1
    nproc_per_node: int = 1  # ranks per node; one per GPU on GPU nodes
    gpus_per_node: int = 0  # 0: CPU nodes, no --gpus-per-node directive
    cpus_per_node: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    mail_user: str | None = None
    mail_type: str | None = None
    job_name: str | None = None
    extra: list[str] = field(default_factory=list)  # more #SBATCH directives, verbatim
    env: list[str] = field(default_factory=list)  # KEY=VALUE exported on every node (NCCL_*)
    setup: list[str] = field(default_factory=list)  # shell lines before the job step
    srun_args: str = ""  # container hooks, e.g. pyxis: --container-image=... --container-mounts=
    signal_lead: int = 120  # seconds between USR1 and the time limit: enough to save
    requeue: bool = True
    max_restarts: int = 20  # a bound on requeues, so a run that never finishes stops
    array_limit: int | None = None  # concurrent array tasks
    port: int = 29500  # the rendezvous port on the head node is port + job id % 1000
    # Shell lines run after training exited 0 without a stop signal, with $run_dir, $config and
    # $train_args set; the first failing one fails the job (e.g. a sweep marks its point done).
    on_success: list[str] = field(default_factory=list)


@dataclass
class Run:
    """One training run of a job: its config file, overrides and run directory."""

    config_path: str
    overrides: list[str]
    cfg: Config

    @property
    def run_dir(self) -> Path:
        return self.cfg.run.run_dir.absolute()


def load_runs(configs: list[str], overrides: list[str]) -> list[Run]:
    return [Run(c, list(overrides), load_config(c, overrides)) for c in configs]


def validate(runs: list[Run], opts: SlurmOptions) -> None:
    """Everything that can be wrong, before anything is written or submitted; ConfigError with
    the value and the fix."""
    if opts.nodes < 1 or opts.nproc_per_node < 1:
        raise ConfigError(
            "--nodes/--nproc-per-node",
            (opts.nodes, opts.nproc_per_node),
            "use positive node and process counts",
        )
    if opts.gpus_per_node < 0:
        raise ConfigError("--gpus-per-node", opts.gpus_per_node, "use 0 (CPU) or more")
    if opts.gpus_per_node and opts.nproc_per_node != opts.gpus_per_node:
        raise ConfigError(
            "--nproc-per-node",
            opts.nproc_per_node,
            f"one rank per GPU: use --nproc-per-node {opts.gpus_per_node} with "
            f"--gpus-per-node {opts.gpus_per_node}",
        )
    topo = Topology(opts.nodes, opts.nproc_per_node)
    for run in runs:
        check_topology(run.cfg, topo)
        tp = run.cfg.parallel.tp
        if opts.gpus_per_node and opts.gpus_per_node % tp:
            # A tensor-parallel group spanning nodes talks over the network every layer.
            raise ConfigError(
                "parallel.tp",
                tp,
                f"keep tensor-parallel groups inside a node: --gpus-per-node "
                f"{opts.gpus_per_node} must be a multiple of tp; use a tp that divides it",
            )
        check_run_dir(run)
    if opts.time is not None:
        limit = time_seconds(opts.time)
        if opts.requeue and opts.signal_lead >= limit:
            raise ConfigError(
                "--signal-lead",
                opts.signal_lead,
                f"the signal must come before the time limit ({opts.time} = {limit} s); "
                f"use a lead below {limit} seconds or a longer --time",
            )
    if opts.signal_lead < 1:
        raise ConfigError("--signal-lead", opts.signal_lead, "use a positive number of seconds")
    for item in opts.env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", item):
            raise ConfigError("--env", item, "use KEY=VALUE, e.g. NCCL_DEBUG=INFO")
    if opts.array_limit is not None and opts.array_limit < 1:
        raise ConfigError("--array-limit", opts.array_limit, "use 1 or more concurrent tasks")
    dirs = [r.run_dir for r in runs]
    for d in dirs:
        if dirs.count(d) > 1:
            raise ConfigError(
                "run.name",
                d.name,
                f"two configs of the array write to {d}; give each config its own run.name",
            )


def _identity(data: dict) -> dict:
    keep = {s: data.get(s, {}) for s in IDENTITY_SECTIONS}
    keep["run"] = {k: data.get("run", {}).get(k) for k in IDENTITY_RUN_KEYS}
    model = dict(keep["model"])
    model.pop("vocab_size", None)  # filled in from the dataset by the first start
    keep["model"] = model
    return keep


def check_run_dir(run: Run) -> None:
    """A run directory that holds another run's config: refuse, rather than resume into it."""
    saved = run.run_dir / "config.yaml"
    if not saved.is_file():
        return
    old = _identity(yaml.safe_load(saved.read_text()) or {})
    new = _identity(run.cfg.to_dict())
    diff = [
        f"{s}.{k}"
        for s in old
        for k in sorted(set(old[s]) | set(new[s]))
        if old[s].get(k) != new[s].get(k)
    ]
    if diff:
        raise ConfigError(
            "run.name",
            run.cfg.run.name,
            f"{run.run_dir} holds a run with a different config ({', '.join(diff)} differ); "
            f"choose another run.name or run.output_dir, or launch with that run's config",
        )


# --- the batch script --------------------------------------------------------------------------


def _q(text: str | Path) -> str:
    return shlex.quote(str(text))


def script_path(runs: list[Run]) -> Path:
    """Where the batch script goes: the run directory, or for an array the output directory
    (the parent of every task's run directory)."""
    if len(runs) == 1:
        return runs[0].run_dir / "slurm.sbatch"
    name = "-".join(r.cfg.run.name for r in runs[:3]) + ("-etc" if len(runs) > 3 else "")
    return runs[0].run_dir.parent / f"array-{name}.sbatch"


def log_dirs(runs: list[Run]) -> list[Path]:
    """The batch shell's log directory first (an array's is shared), then each run's."""
    first = runs[0].run_dir / "logs" if len(runs) == 1 else runs[0].run_dir.parent / "logs"
    return [first] + [r.run_dir / "logs" for r in runs]


def render_script(
    runs: list[Run], opts: SlurmOptions, workdir: Path, python: str = sys.executable
) -> str:
    """The sbatch script's text. Paths are absolute and the job runs in `workdir`, so it does
    not depend on where sbatch is called."""
    array = len(runs) > 1
    name = opts.job_name or (runs[0].cfg.run.name if not array else "sweep")
    log_dir = log_dirs(runs)[0]
    out = "%x-%A_%a.out" if array else "%x-%j.out"
    d = [
        f"--job-name={name}",
        f"--nodes={opts.nodes}",
        "--ntasks-per-node=1",
    ]
    if opts.cpus_per_node:
        d.append(f"--cpus-per-task={opts.cpus_per_node}")
    if opts.gpus_per_node:
        d.append(f"--gpus-per-node={opts.gpus_per_node}")
    for key, value in (
        ("time", opts.time),
        ("partition", opts.partition),
        ("account", opts.account),
        ("qos", opts.qos),
        ("constraint", opts.constraint),
        ("mail-user", opts.mail_user),
        ("mail-type", opts.mail_type),
    ):
        if value:
            d.append(f"--{key}={value}")
    if opts.exclusive:
        d.append("--exclusive")
    if opts.requeue:
        d += [f"--signal=B:USR1@{opts.signal_lead}", "--requeue"]
    d += ["--open-mode=append", f"--chdir={workdir}", f"--output={log_dir}/{out}"]
    if array:
        d.append(
            f"--array=0-{len(runs) - 1}" + (f"%{opts.array_limit}" if opts.array_limit else "")
        )
    d += opts.extra

    rendezvous = (
        ["--standalone"]
        if opts.nodes == 1
        else multi_node_args(
            opts.nodes,
            '"$SLURM_NODEID"',
            '"$head_node"',
            '"$port"',
            '"$SLURM_JOB_ID-$restart"',  # a fresh rendezvous for every start of every job
            '"$is_host"',
        )
    )
    torchrun = " ".join(
        [_q(python), "-m", "launch.agent", f"--nproc-per-node={opts.nproc_per_node}"]
        + rendezvous
        + ["-m", "pretrain.train", '"${train_args[@]}"']
    )
    lines = [
        "#!/bin/bash",
        "# Generated by pretrain-launch --slurm. Submit again with: sbatch <this file>",
        *[f"#SBATCH {x}" for x in d],
        "",
        "set -uo pipefail",
        *[f"export {k}={_q(v)}" for k, v in (e.split("=", 1) for e in opts.env)],
        *opts.setup,
        "",
        "restart=${SLURM_RESTART_COUNT:-0}",
    ]
    if array:
        lines += [
            "# One run per array task: its config and its run directory.",
            "configs=(" + " ".join(_q(r.config_path) for r in runs) + ")",
            "run_dirs=(" + " ".join(_q(r.run_dir) for r in runs) + ")",
            "config=${configs[$SLURM_ARRAY_TASK_ID]}",
            "run_dir=${run_dirs[$SLURM_ARRAY_TASK_ID]}",
        ]
    else:
        lines += [f"config={_q(runs[0].config_path)}", f"run_dir={_q(runs[0].run_dir)}"]
    overrides = " ".join(_q(o) for o in runs[0].overrides)
    lines += [
        "# run.resume=auto last: every start, the first and each requeue, continues from the",
        "# latest complete checkpoint of the run directory.",
        f'train_args=("$config" {overrides + " " if overrides else ""}run.resume=auto)',
        'mkdir -p "$run_dir/logs"',
        'log="$run_dir/logs/job${SLURM_JOB_ID}-restart${restart}"',
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        f"port=$(({opts.port} + SLURM_JOB_ID % 1000))",
        'echo "$(date +%FT%T) job $SLURM_JOB_ID start $restart on $SLURM_JOB_NODELIST:'
        ' head node $head_node:$port, logs $log-node*.log"',
        "",
        "# Runs once on every node (srun). The agent (launch.agent) passes USR1 on to the",
        "# ranks; ignored until its handler is set, USR1 cannot kill it and orphan them.",
        "run_node() {",
        '    is_host=$([ "$SLURM_NODEID" = 0 ] && echo 1 || echo 0)',
        f"    (trap '' USR1; exec {torchrun}) &",
        "    agent=$!",
        "    # proctrack/linuxproc and cgroup signal every process of the step; where a plugin",
        "    # signals only this shell, pass USR1 on to the ranks (the agent's children).",
        "    trap 'pkill -USR1 -P \"$agent\"' USR1",
        "    # SIGTERM (scancel, a time limit) reaches the agent too, which stops the ranks. This",
        "    # shell stays: dead, it would leave the agent to init, out of reach of Slurm's",
        "    # SIGKILL after KillWait (proctrack/linuxproc follows parent pids).",
        "    trap ':' TERM",
        "    while true; do",
        '        wait "$agent"; rc=$?',
        '        kill -0 "$agent" 2>/dev/null || return "$rc"  # else a trapped signal woke wait',
        "    done",
        "}",
        "export -f run_node",
        "# bash cannot export arrays: pass the training arguments as one quoted string.",
        'train_args_str=$(printf "%q " "${train_args[@]}")',
        "export train_args_str head_node port restart",
        "",
        "preempted=0",
        "on_usr1() {",
        '    [ "$preempted" = 1 ] && return  # once: the ranks are already saving',
        "    preempted=1",
        '    echo "$(date +%FT%T) USR1: asking every rank to save at the next step"',
        '    scancel --signal=USR1 "$SLURM_JOB_ID"  # the job steps: run_node on every node',
        "}",
        "trap on_usr1 USR1",
        "",
        *(
            [
                "# The tasks share one MLflow store: create it and the experiment once, under a",
                "# lock (SQLite's schema creation and create_experiment race between tasks).",
                f'flock "$(dirname "$run_dir")/.mlflow.lock" {_q(python)} -m launch.tracking_store'
                ' "${train_args[@]}"',
            ]
            if array
            else []
        ),
        'srun --ntasks-per-node=1 --kill-on-bad-exit=1 --output="$log-node%n.log" '
        + (opts.srun_args + " " if opts.srun_args else "")
        + "bash -c 'eval \"train_args=($train_args_str)\"; run_node' &",
        "step=$!",
        "while true; do",
        '    wait "$step"; rc=$?',
        '    kill -0 "$step" 2>/dev/null || break  # else USR1 woke wait: wait for the save',
        "done",
        "",
        *(
            ['if [ "$preempted" = 0 ] && [ "$rc" = 0 ]; then']
            + [f"    {line} || rc=$?" for line in opts.on_success]
            + ["fi"]
            if opts.on_success
            else []
        ),
        "# Preemption or time limit: the ranks saved and exited 0, so requeue and resume.",
        "# Anything else (a crash, a config error) ends here: requeueing would fail again.",
        'if [ "$preempted" = 1 ] && [ "$rc" = 0 ]; then',
        f'    if [ "$restart" -ge {opts.max_restarts} ]; then',
        f'        echo "$(date +%FT%T) saved; not requeued: {opts.max_restarts} restarts reached"',
        "        exit 1",
        "    fi",
        '    echo "$(date +%FT%T) saved after USR1; requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "fi",
        'if [ "$rc" != 0 ]; then',
        '    echo "$(date +%FT%T) training failed (exit $rc, preempted=$preempted):'
        ' not requeued; see $log-node*.log"',
        "fi",
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)


def submit(path: Path) -> str:
    """sbatch the script; the job id."""
    proc = subprocess.run(
        ["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {path} failed: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]
