"""pretrain.errors.run_cli, the main() of the one-shot commands (pretrain-ckpt, -generate)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = """
import sys
from pretrain.errors import CheckpointError, run_cli

def run(args):
    import warnings
    warnings.warn("a third-party fallback notice")  # raised outside the project code
    if args == "bad":
        raise CheckpointError("no checkpoint at /x: pass a step directory")
    return "line\\n" * 200_000

sys.exit(run_cli(lambda argv: argv, run, sys.argv[1]))
"""


def run_program(arg: str, pipe_to_head: bool) -> subprocess.CompletedProcess:
    cmd = f"{sys.executable} -c '{PROGRAM}' {arg}"
    if pipe_to_head:
        cmd = f"set -o pipefail; {cmd} | head -n 1"
    return subprocess.run(
        ["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)}
    )


def test_output_cut_short_by_the_reader_is_no_error():
    """`pretrain-ckpt inspect ... | head`: the reader closes the pipe early; the command ends
    quietly with exit 0 instead of a BrokenPipeError traceback."""
    done = run_program("good", pipe_to_head=True)
    assert done.stdout == "line\n"
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 0


def test_bad_input_is_one_error_line_and_exit_2():
    done = run_program("bad", pipe_to_head=False)
    assert done.returncode == 2
    # Exactly one line: the third-party warning raised on the way is not on the console.
    assert done.stderr == "error: no checkpoint at /x: pass a step directory\n"
