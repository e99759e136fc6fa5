"""Library code leaves the process environment as it found it (issue 16): the process groups of a
world of one, the MLflow tracker, the warning router and the tokenizer workers; the settings only
DeepSpeed and MLflow read from the environment are scoped (pretrain.environment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import encode
from data_pipeline.tokenizer import Tokenizer
from pretrain.config import load_config
from pretrain.environment import RUN_DEFAULTS, environ_defaults, single_process_world

REPO = Path(__file__).resolve().parents[2]
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")


def test_environ_defaults_adds_only_what_is_missing_and_removes_it_after(monkeypatch) -> None:
    monkeypatch.setenv("PRETRAIN_TEST_SET", "user")
    monkeypatch.delenv("PRETRAIN_TEST_UNSET", raising=False)
    with environ_defaults({"PRETRAIN_TEST_SET": "ours", "PRETRAIN_TEST_UNSET": "ours"}):
        assert os.environ["PRETRAIN_TEST_SET"] == "user"
        assert os.environ["PRETRAIN_TEST_UNSET"] == "ours"
    assert os.environ["PRETRAIN_TEST_SET"] == "user"
    assert "PRETRAIN_TEST_UNSET" not in os.environ
    with pytest.raises(KeyError), environ_defaults({"PRETRAIN_TEST_UNSET": "ours"}):
        raise KeyError("an error inside the block")
    assert "PRETRAIN_TEST_UNSET" not in os.environ


def test_single_process_world_only_without_a_launcher(monkeypatch) -> None:
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    world = single_process_world()
    assert (world["RANK"], world["LOCAL_RANK"], world["WORLD_SIZE"]) == ("0", "0", "1")
    # No port: one picked here could be taken before the store binds it (EADDRINUSE seen
    # under load); setup's store binds a free port itself.
    assert "MASTER_PORT" not in world and "MASTER_ADDR" not in world
    monkeypatch.setenv("RANK", "3")
    assert single_process_world() == {}


# setup() starts torch.distributed and DeepSpeed, which stay for the process: in a child. The
# "imports" child only imports what setup() imports, whose own changes (DeepSpeed's import sets
# PYTORCH_NVML_BASED_CUDA_CHECK, for one) are theirs, not ours.
SETUP = """
import json, os, sys
before = dict(os.environ)
if sys.argv[2] == "imports":
    import deepspeed, megatron.core.parallel_state, torch.distributed
    world = None
else:
    from pretrain import distributed
    from pretrain.config import load_config
    import torch.distributed as dist
    layout = distributed.setup(load_config(sys.argv[1], ["run.device=cpu"], 1))
    world = [dist.get_rank(), dist.get_world_size(), layout.world_size, layout.dp_size]
after = dict(os.environ)
changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
print(json.dumps({"changed": changed, "world": world}))
"""


@pytest.mark.slow
def test_setup_of_a_world_of_one_leaves_the_environment_unchanged() -> None:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.pop("MASTER_PORT", None)
    env.pop("DS_ACCELERATOR", None)
    env["PYTHONPATH"] = str(REPO)
    tiny = str(REPO / "configs" / "tiny.yaml")
    children = {
        mode: subprocess.Popen(
            [sys.executable, "-c", SETUP, tiny, mode],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode in ("imports", "setup")
    }
    results = {}
    for mode, child in children.items():
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
        results[mode] = json.loads(out.strip().splitlines()[-1])
    assert results["setup"]["world"] == [0, 1, 1, 1]
    assert results["setup"]["changed"] == results["imports"]["changed"]
    assert not set(results["setup"]["changed"]) & {*LAUNCHER_VARIABLES, "MASTER_PORT"}


def test_tracker_start_leaves_the_environment_unchanged(monkeypatch, tmp_path: Path) -> None:
    from pretrain import tracking, tracking_outbox

    for name in RUN_DEFAULTS:
        monkeypatch.delenv(name, raising=False)

    class Outbox:  # no store: what start() does to the process is the question here
        warned = False

        def __init__(self, *args, **kwargs):
            pass

        def call(self, name, fn):
            done = threading.Event()
            done.set()
            return done

    monkeypatch.setattr(tracking_outbox, "Outbox", Outbox)
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [f"run.output_dir={tmp_path}", "tracking.uri=http://127.0.0.1:9"],
        1,
    )
    config_file = tmp_path / "config.yaml"
    config_file.write_text("{}\n")
    before = dict(os.environ)
    tracker = tracking.Tracker(cfg, True)
    assert tracker.uri.startswith("http://")
    tracker.start(None, config_file, params={"a": "1"})
    assert dict(os.environ) == before


def test_route_warnings_leaves_the_environment_unchanged(monkeypatch) -> None:
    from pretrain import lifecycle

    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    before = dict(os.environ)
    lifecycle.route_warnings()
    assert dict(os.environ) == before


def test_tokenizer_workers_are_single_threaded_and_the_parent_environment_untouched(
    monkeypatch,
) -> None:
    monkeypatch.delenv(encode.PARALLELISM_ENV, raising=False)

    # What each worker reports instead of ids: its own TOKENIZERS_PARALLELISM.
    def report(self, texts):
        seen = os.environ.get(encode.PARALLELISM_ENV)
        return np.array([len(texts)]), np.array([seen == "false"], dtype=np.int64)

    monkeypatch.setattr(encode.ChunkEncoder, "__call__", report)
    tok = Tokenizer.train(iter(["some text to train on"] * 20), vocab_size=400)
    chunks = [(i, [f"document {i}"]) for i in range(6)]
    for workers in (1, 2):
        seen = []
        for tag, (_, single_threaded) in encode.encode_in_order(tok, chunks, np.uint16, workers):
            # Between results too, not only once the encoding is over.
            assert encode.PARALLELISM_ENV not in os.environ
            seen.append((tag, bool(single_threaded[0])))
        assert seen == [(i, True) for i in range(6)]
    assert encode.PARALLELISM_ENV not in os.environ
