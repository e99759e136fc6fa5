"""One comparison of a checkpoint's layout with this run's (pretrain.reshard.changes), used both
where a config is at hand (resharding) and where only the process layout is (checkpoint.load
without a config, which can only refuse)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint
from pretrain.distributed import Layout
from pretrain.errors import CheckpointError


def _layout(tp: int, pp: int, dp: int) -> Layout:
    return Layout(
        rank=0,
        world_size=tp * pp * dp,
        local_rank=0,
        device=torch.device("cpu"),
        dp_rank=0,
        dp_size=dp,
        tp_rank=0,
        tp_size=tp,
        pp_rank=0,
        pp_size=pp,
        grad_accum=1,
        tp_group=None,
        dp_group=None,
    )


def _checkpoint(tmp_path: Path, **layout: int) -> Path:
    path = tmp_path / "step_00000010"
    path.mkdir()
    meta = {"tp": 1, "pp": 1, "dp": 2, "zero_stage": 1, "precision": "fp32", **layout}
    (path / checkpoint.COMPLETE).write_text(json.dumps(meta))
    return path


class NoEngine:  # a refused checkpoint never reaches DeepSpeed's loader
    def load_checkpoint(self, *args, **kwargs):
        raise AssertionError("the engine was asked to load a refused checkpoint")


@pytest.mark.parametrize(
    ("saved", "run", "named"),
    [
        ({"tp": 2}, (1, 1, 2), "tp 2 -> 1"),
        ({"pp": 2}, (1, 1, 2), "pp 2 -> 1"),
        # ZeRO-1 shards the optimizer over data-parallel ranks: a dp change is a layout change.
        ({"dp": 2}, (1, 1, 1), "dp 2 -> 1"),
    ],
)
def test_load_without_a_config_refuses_what_the_reshard_comparison_names(
    tmp_path: Path, saved: dict, run: tuple[int, int, int], named: str
) -> None:
    path = _checkpoint(tmp_path, **saved)
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load(NoEngine(), _layout(*run), path, [])
    message = str(refused.value)
    assert named in message and str(path) in message
