"""The default MLflow store (a SQLite file): created or migrated once, before the ranks start,
so that no launch ever sees a half-built one.

MLflow builds a SQLite store in place, one DDL statement at a time (pysqlite commits each), so a
process killed during the creation or a schema migration leaves a file that every later process
refuses ("table ... already exists", "out-of-date database schema"). Here the store is built or
migrated in a temporary file beside the real one and renamed over it when complete, under an
exclusive lock on `<store>.lock`: concurrent launches wait for the first, and a launch killed at
any point leaves either no store or the previous complete one. A store left broken by an earlier
version (no runs in it) is moved aside to `<store>.broken-<time>`, never deleted.

Stores other than SQLite files (an `mlflow server`, a database server) are the server's to
create; nothing here contacts them, so an unreachable server never delays a launch.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from pretrain.config import Config, ConfigError

SQLITE = "sqlite:///"
CREATING = ".creating-"  # <dir>/.mlflow.db.creating-<pid>: a store being built or migrated


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite tracking URI, or None for any other store."""
    if not uri.startswith(SQLITE):
        return None
    rest = uri[len(SQLITE) :]
    return None if rest in ("", ":memory:") else Path(rest)


@contextlib.contextmanager
def store_lock(db: Path) -> Iterator[None]:
    """Exclusive lock on `<db>.lock` (a file of its own: the Slurm script's `flock` on the output
    directory's .mlflow.lock may be held by this process's parent)."""
    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(db.with_name(db.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _engine(db: Path):
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    # NullPool: no connection outlives its use, so the file can be renamed right after.
    return sqlalchemy.create_engine(f"{SQLITE}{db}", poolclass=NullPool)


def _state(db: Path) -> tuple[bool, int]:
    """(schema complete and current, number of runs the store holds)."""
    import sqlalchemy
    from mlflow.store.db import utils

    engine = _engine(db)
    try:
        current = utils._all_tables_exist(engine) and (
            utils._get_schema_version(engine) == utils._get_latest_schema_revision()
        )
        with engine.connect() as conn:
            try:
                runs = conn.execute(sqlalchemy.text("SELECT COUNT(*) FROM runs")).scalar() or 0
            except sqlalchemy.exc.OperationalError:  # no runs table: nothing was ever logged
                runs = 0
        return current, int(runs)
    finally:
        engine.dispose()


def _build(db: Path, source: Path | None) -> None:
    """Write a complete, current store to `db`: a new one, or a migrated copy of `source`."""
    from mlflow.store.db import utils

    tmp = db.with_name(f".{db.name}{CREATING}{os.getpid()}")
    tmp.unlink(missing_ok=True)
    if source is not None:
        shutil.copy2(source, tmp)
    engine = _engine(tmp)
    quiet = logging.getLogger("mlflow.store.db.utils")  # "Creating initial tables...": ours to say
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        if source is None:
            utils._initialize_tables(engine)  # creates the first schema, then migrates to head
        else:
            utils._upgrade_db(engine)
        utils._verify_schema(engine)
    finally:
        quiet.setLevel(level)
        engine.dispose()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, db)


def _clear_leftovers(db: Path) -> None:
    """Temporary stores of launches that died while building one (the lock is ours, so no live
    process is writing them)."""
    for p in db.parent.glob(f".{db.name}{CREATING}*"):
        p.unlink(missing_ok=True)


def prepare_sqlite(db: Path) -> str | None:
    """Make `db` a complete, current MLflow store; returns a line describing what was done, or
    None when the store was already fine. Raises ConfigError for a store that holds runs but
    cannot be migrated."""
    db = db.resolve()
    with store_lock(db):
        _clear_leftovers(db)
        if not db.exists():
            _build(db, None)
            return f"MLflow: created the tracking store {db}"
        current, runs = _state(db)
        if current:
            return None
        if runs == 0:
            # Half-built by a killed launch of an earlier version: nothing in it to keep.
            aside = db.with_name(f"{db.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(db, aside)
            _build(db, None)
            return f"MLflow: {db} was incomplete and held no runs; moved it to {aside}, built anew"
        try:
            _build(db, db)
        except Exception as e:  # the copy is discarded; the store itself was never touched
            _clear_leftovers(db)
            raise ConfigError(
                "tracking store",
                str(db),
                f"it holds {runs} runs but its schema could not be migrated ({e}); run "
                f"`mlflow db upgrade {SQLITE}{db}` after a backup, or set tracking.uri to "
                f"another store",
            ) from None
        return f"MLflow: migrated the tracking store {db} to the current schema ({runs} runs kept)"


def prepare_store(cfg: Config) -> str | None:
    """Create or migrate the run's store and its experiment, once, before any rank starts (the
    launcher and rank 0's start-up call this). Only for SQLite stores; others are left to their
    server. Returns a line to print, or None."""
    from pretrain.tracking import ensure_experiment, tracking_uri

    if not cfg.tracking.enabled:
        return None
    uri = tracking_uri(cfg)
    db = sqlite_path(uri)
    if db is None:
        return None
    try:
        note = prepare_sqlite(db)
        with store_lock(db.resolve()):  # two runs creating one experiment at once collide
            ensure_experiment(cfg, uri)
    except PermissionError as e:
        raise ConfigError(
            "tracking store", str(db), f"cannot write it ({e}); set tracking.uri elsewhere"
        ) from None
    return note
