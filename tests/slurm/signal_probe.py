"""Stands in for pretrain.train inside a generated Slurm job, to see which ranks a signal reaches:
each rank writes ready-rank<R>, waits for USR1 and writes usr1-rank<R>. On the requeued start,
a rank that already got it exits 0 at once (the run is "done"). Like pretrain.train's entry point
it ignores the stop signals once its exit code is decided: USR1 reaches each rank more than once
(Slurm signals every process of the step, and the job script passes it on)."""

import os
import signal
import sys
import time
from pathlib import Path

from pretrain.lifecycle import ignore_stop_signals

out = Path(next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("run.output_dir=")))
rank = os.environ["RANK"]
got: list[int] = []
signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
if (out / f"usr1-rank{rank}").exists():
    sys.exit(0)
(out / f"ready-rank{rank}").write_text(str(os.getpid()))
deadline = time.monotonic() + 120
while not got and time.monotonic() < deadline:
    time.sleep(0.1)
if got:
    (out / f"usr1-rank{rank}").write_text("")
ignore_stop_signals()
sys.exit(0 if got else 3)
