"""Start-up time of a tiny run, launch to first step, by phase.

Two measurements in one go:

1. `pretrain-launch configs/tiny.yaml --nproc-per-node 2` with a few steps: the ranks' own
   start-up line (pretrain.lifecycle.StartupClock: imports and checks, process groups (with
   DeepSpeed's and megatron's imports), model, engine, data, hooks) and the wall time of the
   whole launch, repeated ROUNDS times; the median of each.
2. The reference, in fresh single processes of the same interpreter: `import torch` alone, and
   the imports a rank needs before it can train (torch, DeepSpeed, megatron-core, our trainer).
3. What was removed from start-up, before and after in the same run: each round also launches
   the same run with the removed imports put back into every rank (MLflow, which DeepSpeed's
   autotuner imported, pyarrow.dataset with pandas, which the manifest reader imported, and
   TorchDynamo with Inductor, which megatron-core's `torch.compile` decorators imported; see
   pretrain/startup_imports.py), through a sitecustomize module on PYTHONPATH. The two
   kinds alternate, so both see the same load. CPU time is the launch's and all its
   processes' (user + system), steadier than wall time on a shared machine.

usage: python benchmarks/startup.py [--data DIR] [--rounds N] [--put-back mlflow pyarrow compile]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).parent / "pretrain-launch"
STARTUP = re.compile(r"start-up: ([\d.]+) s from launch to the first step \((.*)\)")
RANK_IMPORTS = (  # as pretrain.train imports them
    "from pretrain.startup_imports import deepspeed_without_mlflow, megatron_without_dynamo\n"
    "with deepspeed_without_mlflow(), megatron_without_dynamo():\n"
    "    import torch, deepspeed, megatron.core.parallel_state\n"
    "import pretrain.trainer, pretrain.engine, data_pipeline.loader"
)


def timed_python(code: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t


# What start-up no longer imports, by --put-back name: a "before" launch runs the chosen ones in
# every rank (torchrun sets LOCAL_RANK for them) at interpreter start, from a sitecustomize.
PUT_BACK = {
    "mlflow": "import mlflow",
    "pyarrow": "import pyarrow.dataset",
    # what each of megatron-core's compiled activations did at its import
    "compile": "import torch; torch.compile(len)",
}


def sitecustomize(names: list[str]) -> str:
    lines = "".join(f"    {PUT_BACK[name]}\n" for name in names)
    return f'import os\nif "LOCAL_RANK" in os.environ:\n{lines}'


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_launch(
    data: str, runs: Path, i: int | str, env: dict[str, str] | None = None
) -> tuple[float, float, dict[str, float], float]:
    t, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.run(
        [
            str(LAUNCH),
            "configs/tiny.yaml",
            "--nproc-per-node",
            "2",
            f"data.path={data}",
            f"run.output_dir={runs}",
            f"run.name=startup{i}",
            "run.train_steps=5",
            "run.eval_interval=0",
            "run.sample_tokens=0",
            "tracking.enabled=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    wall, cpu = time.perf_counter() - t, _children_cpu() - cpu
    m = STARTUP.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        sys.exit(f"launch failed:\n{proc.stdout}\n{proc.stderr}")
    phases = {}
    for part in m.group(2).split(", "):
        name, seconds = part.rsplit(" ", 1)
        phases[name] = float(seconds)
    return wall, float(m.group(1)), phases, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "stdlib"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--put-back",
        nargs="+",
        choices=list(PUT_BACK),
        default=list(PUT_BACK),
        help="the removed imports the 'before' launches put back (default: all)",
    )
    args = p.parse_args()
    torch_import = statistics.median(timed_python("import torch") for _ in range(args.rounds))
    rank_imports = statistics.median(timed_python(RANK_IMPORTS) for _ in range(args.rounds))
    with tempfile.TemporaryDirectory() as tmp:
        put_back = Path(tmp) / "put_back"
        put_back.mkdir()
        (put_back / "sitecustomize.py").write_text(sitecustomize(args.put_back))
        path = os.pathsep.join(p for p in (str(put_back), os.environ.get("PYTHONPATH")) if p)
        runs, before = [], []
        for i in range(args.rounds):
            runs.append(one_launch(args.data, Path(tmp), i))
            before.append(one_launch(args.data, Path(tmp), f"before{i}", {"PYTHONPATH": path}))
    wall = statistics.median(r[0] for r in runs)
    startup = statistics.median(r[1] for r in runs)
    names = list(runs[0][2])
    print(f"reference: `import torch` {torch_import:.1f} s; a rank's imports {rank_imports:.1f} s")
    print(f"launch wall time (5 steps, exit included) {wall:.1f} s = {wall / torch_import:.1f}x")
    print(f"start-up, launch to first step: {startup:.1f} s = {startup / torch_import:.1f}x")
    print(f"| phase | seconds (median of {args.rounds}) | x `import torch` |")
    print("|---|---|---|")
    for name in names:
        s = statistics.median(r[2][name] for r in runs)
        print(f"| {name} | {s:.1f} | {s / torch_import:.2f} |")
    put = ", ".join(args.put_back)
    print(f"removed imports put back ({put}: before) against as is (after), medians:")
    for what, k in (("start-up", 1), ("launch CPU time", 3), ("launch wall time", 0)):
        a, b = statistics.median(r[k] for r in runs), statistics.median(r[k] for r in before)
        print(f"  {what}: before {b:.1f} s, after {a:.1f} s, after/before {a / b:.2f}")


if __name__ == "__main__":
    main()
