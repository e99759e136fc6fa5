"""Sweep specs: the grid they define, warmup-stable-decay branching, refusals of bad specs, and
the Slurm submission (printed, not submitted). No training here (tests/integration/
test_sweep.py runs a sweep)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pretrain.config import ConfigError
from pretrain.models.flops import flops_per_token
from pretrain.scaling import cli
from pretrain.scaling.runner import is_done, point_cfg, slurm_jobs
from pretrain.scaling.spec import load_spec

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def write_spec(tmp_path: Path, **changes) -> Path:
    spec = {
        "name": "ladder",
        "base": TINY,
        "overrides": ["optim.warmup_steps=2", "parallel.micro_batch_size=4"],
        "output_dir": str(tmp_path / "out"),
        "ladder": {
            "shapes": [
                {"name": "s", "n_layers": 1, "d_model": 32, "n_heads": 2},
                {"name": "m", "n_layers": 2, "d_model": 64, "n_heads": 4},
            ]
        },
        "budgets": {"tokens": [12800, 25600, 51200]},  # 100, 200, 400 steps of 4 x 32 tokens
        "schedule": "wsd",
        "cooldown_fraction": 0.25,
        "branch_every": 30,
    }
    spec.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_token_budgets_and_wsd_branches(tmp_path):
    spec = load_spec(write_spec(tmp_path), vocab_size=512)
    assert [p.id for p in spec.points] == [
        "s-D1.28e+04",
        "s-D2.56e+04",
        "s-D5.12e+04",
        "m-D1.28e+04",
        "m-D2.56e+04",
        "m-D5.12e+04",
    ]
    s100, s200, s400 = spec.points[:3]
    assert (s100.steps, s200.steps, s400.steps) == (100, 200, 400)
    assert s400.branch_of is None and s400.save_every == 30
    # Cooldowns start at 75 and 150; the last checkpoints at or before them (every 30): 60, 150.
    assert (s100.branch_of, s100.branch_step) == (s400.id, 60)
    assert (s200.branch_of, s200.branch_step) == (s400.id, 150)
    assert s100.trained_steps == 40
    # Without embeddings by default. One block of d=32: weights 4 d^2 (attention) + 8 d^2 (MLP
    # of 4d), biases 3d + d + 4d + d, three LayerNorms (two in the block, the final) of 2d.
    assert s100.N == 12 * 32 * 32 + 9 * 32 + 3 * 64
    # FLOPs per token: 6 per matrix weight, plus attention 12 * layers * seq_len * d.
    fpt = 6 * 12 * 32 * 32 + 12 * 1 * 32 * 32
    assert s100.C == fpt * 12800
    cfg = point_cfg(spec, s100, "PARENT")
    assert cfg.run.branch_from.endswith("ladder-s-D5.12e+04/checkpoints/step_00000060")
    assert cfg.run.train_steps == 100 and cfg.optim.schedule == "wsd"
    assert "sweep.point=s-D1.28e+04" in cfg.tracking.tags and cfg.tracking.parent_run_id == "PARENT"
    longest = point_cfg(spec, s400, "PARENT")
    assert longest.checkpoint.interval == longest.checkpoint.keep_every == 30
    assert longest.run.branch_from is None


def test_isoflop_budgets_follow_the_flops_per_token(tmp_path):
    path = write_spec(
        tmp_path, budgets={"flops": [1e10, 2e10, 4e10]}, schedule="cosine", embeddings=True
    )
    spec = load_spec(path, vocab_size=512)
    for pt in spec.points:
        cfg = point_cfg(spec, pt, None)
        fpt = flops_per_token(cfg.model)  # embeddings counted
        assert pt.steps == round(pt.budget / fpt / 128) and pt.D == pt.steps * 128
        assert pt.C == fpt * pt.D and pt.branch_of is None  # cosine: independent runs
    assert abs(spec.points[0].C / 1e10 - 1) < 0.01


def test_depth_rule_ladder(tmp_path):
    path = write_spec(
        tmp_path, ladder={"rule": {"depths": [1, 2, 3], "width_per_layer": 32, "head_dim": 16}}
    )
    shapes = load_spec(path).shapes
    assert [(s["n_layers"], s["d_model"], s["n_heads"]) for s in shapes] == [
        (1, 32, 2),
        (2, 64, 4),
        (3, 96, 6),
    ]


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"budget": [1]}, "spec keys"),
        ({"budgets": {"tokens": [0]}}, "budgets.tokens"),
        ({"budgets": {"steps": [10]}}, "budgets"),
        ({"schedule": "linear"}, "schedule"),
        ({"ladder": {"shapes": [{"name": "x", "d_model": 32, "layers": 2}]}}, "ladder.shapes[0]"),
        (
            {"ladder": {"rule": {"depths": [3], "width_per_layer": 20, "head_dim": 16}}},
            "ladder.rule.head_dim",
        ),
        ({"budgets": {"tokens": [12800, 12850]}}, "budgets.tokens"),  # both: 100 steps
        ({"budgets": {"tokens": [1280, 51200]}}, "budgets"),  # branch inside the warmup
    ],
)
def test_bad_specs_name_the_field(tmp_path, changes, field):
    path = write_spec(tmp_path, **changes)
    with pytest.raises(ConfigError) as e:
        load_spec(path)
    assert e.value.field_name == f"sweep {field}"


def test_plan_prints_the_grid(tmp_path, capsys):
    assert cli.main(["plan", str(write_spec(tmp_path)), "data.path=/nonexistent"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["point", "N", "D"]
    assert len(out) == 1 + 6 + 1
    row = next(line for line in out if line.startswith("s-D1.28e+04"))
    assert "s-D5.12e+04@60" in row and row.split()[-1] == "todo"


def test_slurm_submission_is_two_arrays(tmp_path, capsys):
    """Runs that can start now in one array; cooldowns of unfinished runs in a second array
    that waits for the first (afterok)."""
    path = write_spec(tmp_path)
    spec = load_spec(path)
    jobs = slurm_jobs(spec, None)
    assert [len(pts) for pts, _ in jobs] == [2, 4] and [dep for _, dep in jobs] == [False, True]
    assert cli.main(["run", str(path), "--slurm", "--dry-run", "--time", "1:00:00"]) == 0
    out = capsys.readouterr().out
    scripts = out.split("#!/bin/bash")[1:]
    assert len(scripts) == 2
    assert "#SBATCH --array=0-1" in scripts[0] and "--dependency" not in scripts[0]
    assert "#SBATCH --array=0-3" in scripts[1]
    assert "#SBATCH --dependency=afterok:" in scripts[1]
    # Each task marks its point done after a clean exit (run on Slurm: tests/slurm/).
    assert all('-m pretrain.scaling.done "${train_args[@]}" || rc=$?' in s for s in scripts)
    assert (tmp_path / "out" / "ladder" / "configs" / "s-D1.28e+04.yaml").is_file()


def _finish(spec, pt, step=None):
    """What a finished training run leaves: its final checkpoint, complete, named by latest."""
    ckpt = spec.sweep_dir / f"{spec.name}-{pt.id}" / "checkpoints"
    tag = f"step_{(step or pt.steps):08d}"
    (ckpt / tag).mkdir(parents=True, exist_ok=True)
    (ckpt / tag / "COMPLETE").write_text("")
    (ckpt / "latest").write_text(tag)


def test_a_point_is_done_at_its_final_checkpoint(tmp_path):
    spec = load_spec(write_spec(tmp_path))
    pt = spec.points[0]
    assert not is_done(spec, pt)
    _finish(spec, pt, step=60)  # an intermediate checkpoint: an interrupted run
    assert not is_done(spec, pt)
    _finish(spec, pt)
    assert not is_done(spec, pt)  # the process has not exited cleanly (no marker)
    (spec.sweep_dir / f"{spec.name}-{pt.id}" / "sweep-point-done").write_text("")
    assert is_done(spec, pt)
    (
        spec.sweep_dir / f"{spec.name}-{pt.id}" / "checkpoints" / "step_00000100" / "COMPLETE"
    ).unlink()
    assert not is_done(spec, pt)  # latest names a save that never completed


def test_run_trains_only_unfinished_points_in_order(tmp_path, monkeypatch):
    """Each size's longest run before its cooldowns; a second run after an interruption trains
    only what is missing (the real processes: tests/integration/test_sweep.py)."""
    from pretrain.scaling import runner

    spec = load_spec(write_spec(tmp_path))
    trained: list[str] = []
    calls: list[str] = []

    def fake_train(cmd, **kwargs):
        pid = Path(cmd[-1]).stem
        trained.append(pid)
        calls.append(pid)
        if len(calls) == 3:
            return -9  # the third run is killed: no final checkpoint
        _finish(spec, spec.point(pid))
        return 0

    monkeypatch.setattr(runner, "parent_run", lambda spec: "PARENT")
    monkeypatch.setattr(runner.subprocess, "call", fake_train)
    assert runner.run_local(spec, say=lambda *a: None) == -9
    assert trained == ["s-D5.12e+04", "s-D2.56e+04", "s-D1.28e+04"]
    trained.clear()
    assert runner.run_local(spec, say=lambda *a: None) == 0
    assert trained == ["s-D1.28e+04", "m-D5.12e+04", "m-D2.56e+04", "m-D1.28e+04"]
