"""Run `python -m launch.tracking_store ARGS` and SIGKILL it just before its Nth schema statement
(CREATE, ALTER or DROP), the way a launch dies mid-way through building the MLflow store.

usage: python store_killer.py N CONFIG [overrides...]
"""

import itertools
import os
import signal
import sys

from sqlalchemy import event
from sqlalchemy.engine import Engine

from launch.tracking_store import main


def kill_at(n: int) -> None:
    seen = itertools.count(1)

    @event.listens_for(Engine, "before_cursor_execute")
    def _count(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith(("CREATE", "ALTER", "DROP")):
            if next(seen) == n:
                os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    kill_at(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
