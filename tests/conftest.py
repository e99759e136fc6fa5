"""Shared fixtures: a small real dataset built from the Python standard library, and a
single-process gloo world for in-process model tests."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from data_pipeline.sources import stdlib_sources

# Which stdlib packages the test corpus is made of: plain Python source that every CPython
# ships, a few hundred kilobytes, enough for several shards at a small shard size.
CORPUS_PACKAGES = ("json", "email", "http", "logging")


def corpus_files() -> list[str]:
    files = [str(p) for p in stdlib_sources()]
    return [f for f in files if any(f"/{pkg}/" in f for pkg in CORPUS_PACKAGES)]


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> str:
    """A dataset of ~40 stdlib modules: 512-token BPE, many small shards, a validation split."""
    from data_pipeline.build import build

    out = tmp_path_factory.mktemp("data") / "stdlib_small"
    build(
        corpus_files(),
        out,
        vocab_size=512,
        shard_tokens=20_000,
        val_fraction=0.1,
        seed=0,
        progress=False,
    )
    return str(out)


@pytest.fixture(scope="session")
def bytes_dataset(tmp_path_factory) -> str:
    """The same modules with the byte tokenizer (359 ids): a character-level corpus on which
    tiny models keep improving past the unigram loss within a few hundred steps."""
    from data_pipeline.build import build

    out = tmp_path_factory.mktemp("data") / "stdlib_small_bytes"
    build(
        corpus_files(),
        out,
        tokenizer="bytes",
        shard_tokens=20_000,
        val_fraction=0.1,
        seed=0,
        progress=False,
    )
    return str(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def world1():
    """torch.distributed and megatron-core groups for a world of one process (TP=1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    yield ps.get_tensor_model_parallel_group()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _skip_gpu_without_cuda(request):
    if request.node.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.fixture
def group_starts(monkeypatch) -> list[str]:
    """Every attempt to start a process group during the test, recorded and refused. (Other
    tests of the session may hold a world of one already, so "no group exists" cannot be
    asserted here; "none is started" can.)"""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    calls: list[str] = []

    def refuse(name):
        def start(*args, **kwargs):
            calls.append(name)
            raise RuntimeError(f"{name} called while the layout is being checked")

        return start

    for module, name in (
        (dist, "init_process_group"),
        (dist, "new_group"),
        (ps, "initialize_model_parallel"),
    ):
        monkeypatch.setattr(module, name, refuse(name))
    return calls
