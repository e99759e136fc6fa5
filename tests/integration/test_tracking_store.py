"""Store safety (pretrain.tracking_store): a launch killed while it builds or migrates the MLflow
SQLite store leaves no half-built store behind, the next launch in the same output directory
works, and the runs an older store holds survive.

The kill is real: store_killer.py runs `python -m launch.tracking_store` (the step the launcher,
rank 0's start-up and the Slurm script run before training) and SIGKILLs it in the middle of the
schema statements."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
KILLER = Path(__file__).with_name("store_killer.py")
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
# mlflow 3.17 builds a store with 334 CREATE/ALTER/DROP statements: the 150th is mid-migration.
KILL_AT = 150
TIMEOUT = 900


def killed_build(*overrides: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(KILLER), str(KILL_AT), TINY, *overrides],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def client(out: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{out / 'mlflow.db'}")


def test_a_launch_killed_while_creating_the_store_leaves_none_and_the_next_launch_works(
    tmp_path, small_dataset
):
    out = tmp_path / "runs"
    killed_build(f"run.output_dir={out}")
    assert not (out / "mlflow.db").exists()  # no store, rather than a half-built one

    proc = subprocess.run(
        [
            str(BIN / "pretrain-train"),
            TINY,
            f"data.path={small_dataset}",
            f"run.output_dir={out}",
            "run.name=after",
            "run.train_steps=2",
            "run.log_interval=1",
            "optim.warmup_steps=1",
            "run.sample_tokens=0",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not list(out.glob("mlflow.db.broken-*"))  # nothing half-built had to be moved aside
    assert not list(out.glob(".mlflow.db.creating-*"))  # the killed launch's temporary file
    c = client(out)
    run = c.search_runs([c.get_experiment_by_name("pretrain").experiment_id])[0]
    assert run.info.run_name == "after" and run.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "loss")] == [1, 2]


def old_store_with_a_run(db: Path) -> str:
    """A store in MLflow's first schema (before every migration), holding one run with a
    metric: what an old installation left."""
    import sqlalchemy
    from mlflow.store.tracking.dbmodels import initial_models as m

    db.parent.mkdir(parents=True)
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    m.Base.metadata.create_all(engine)
    run_id = "0123456789abcdef0123456789abcdef"
    with sqlalchemy.orm.Session(engine) as s:
        s.add(m.SqlExperiment(experiment_id=0, name="Default", artifact_location=str(db.parent)))
        s.add(
            m.SqlRun(
                run_uuid=run_id,
                name="old",
                user_id="someone",
                experiment_id=0,
                status="FINISHED",
                start_time=1000,
                lifecycle_stage="active",
                source_type="LOCAL",
                artifact_uri=str(db.parent / "old"),
            )
        )
        s.add(m.SqlMetric(key="loss", value=1.25, timestamp=2000, run_uuid=run_id))
        s.commit()
    engine.dispose()
    return run_id


def test_a_migration_killed_midway_leaves_the_old_store_and_its_runs_intact(tmp_path):
    out = tmp_path / "runs"
    db = out / "mlflow.db"
    run_id = old_store_with_a_run(db)
    before = sha256(db)
    killed_build(f"run.output_dir={out}")
    assert sha256(db) == before  # the migration was working on a copy

    proc = subprocess.run(
        [sys.executable, "-m", "launch.tracking_store", TINY, f"run.output_dir={out}"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "migrated the tracking store" in proc.stdout and "(1 runs kept)" in proc.stdout
    assert not list(out.glob(".mlflow.db.creating-*"))
    c = client(out)
    assert c.get_run(run_id).info.run_name == "old"
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "loss")] == [(0, 1.25)]
    assert c.get_experiment_by_name("pretrain") is not None


def test_a_half_built_store_without_runs_is_moved_aside_and_rebuilt(tmp_path):
    """What a killed launch of an earlier version left, building the store in place as MLflow
    does: the schema statements up to the KILL_AT-th, no runs. MLflow itself refuses it."""
    import itertools

    import sqlalchemy
    from mlflow.store.db import utils
    from mlflow.store.tracking.dbmodels import initial_models as m

    from pretrain.tracking_store import prepare_sqlite

    db = tmp_path / "mlflow.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    m.Base.metadata.create_all(engine)  # MLflow's first tables, then the migrations
    seen = itertools.count(1)

    @sqlalchemy.event.listens_for(engine, "before_cursor_execute")
    def _die(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith(("CREATE", "ALTER", "DROP")):
            if next(seen) == KILL_AT:
                raise KeyboardInterrupt  # the launch dies here

    with pytest.raises(KeyboardInterrupt):
        utils._upgrade_db(engine)
    engine.dispose()
    from mlflow import MlflowClient

    # Another spelling of the path: MLflow caches engines per URI, and this one's connection
    # would keep pointing at the broken file after it is moved aside.
    with pytest.raises(Exception, match="already exists|duplicate column|out-of-date"):
        MlflowClient(f"sqlite:///{tmp_path}/./mlflow.db").search_experiments()

    note = prepare_sqlite(db)
    assert note is not None and "held no runs; moved it to" in note
    assert len(list(tmp_path.glob("mlflow.db.broken-*"))) == 1
    assert prepare_sqlite(db) is None  # complete and current now: nothing to do
    assert client(tmp_path).search_experiments()  # MLflow opens it


def test_a_store_with_runs_that_cannot_be_migrated_stops_with_an_error(tmp_path):
    import sqlalchemy

    from pretrain.config import ConfigError
    from pretrain.tracking_store import prepare_sqlite

    db = tmp_path / "runs" / "mlflow.db"
    old_store_with_a_run(db)
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:  # a schema version this MLflow has never heard of
        conn.execute(sqlalchemy.text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
        conn.execute(sqlalchemy.text("INSERT INTO alembic_version VALUES ('f00dfeed0000')"))
    engine.dispose()
    before = sha256(db)
    with pytest.raises(ConfigError, match="holds 1 runs but its schema could not be migrated"):
        prepare_sqlite(db)
    assert sha256(db) == before
    assert not list(db.parent.glob(".mlflow.db.creating-*"))
