"""reshard_worker.py with the ZeRO stage exactly as configured (the behaviour before one-rank
ZeRO-1/2 ran as stage 0): makes the checkpoints an older version wrote at DP=1, and the
reference that test_one_rank_zero.py compares the stage-0 run against.

usage: torchrun ... tests/distributed/configured_zero_worker.py (reshard_worker.py's arguments)
"""

from __future__ import annotations

import reshard_worker

from pretrain import engine


def configured(cfg, dp_size: int) -> int:
    return cfg.parallel.zero_stage


if __name__ == "__main__":
    # Module attribute lookups at call time: deepspeed_config, build_engine, train.py's layout
    # line and checkpoint.layout_change all see this one.
    engine.effective_zero_stage = configured
    reshard_worker.main()
