"""Tracking faults: nothing lost, nothing duplicated, training never stops for MLflow.

tests/test_tracking.py already kills a real `mlflow server` mid-run and syncs after a restart.
This file adds: the server restarted mid-run (the tracker catches up by itself), the SQLite store
held under an exclusive lock by another process, and a sync killed between MLflow applying
operations and the journal recording it (the replay must duplicate nothing).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_checks import assert_no_crash, invoke
from test_tracking import _content, _record_run, mlflow_server, store

from openrelease.params import PipelineParams
from openrelease.record import tracking
from openrelease.record.tracking import StageTracker

__all__ = ["mlflow_server", "store"]  # fixtures reused from tests/test_tracking.py

LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


def _rows(db: Path) -> dict[str, int]:
    """Row count of every table of an MLflow SQLite store."""
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


def _db(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///"))


def _sync(expect_applied: int) -> None:
    """`openrelease tracking sync --json` applies exactly ``expect_applied`` operations."""
    result = invoke("tracking", "sync", "--json")
    assert result.exit_code == 0, result.output
    assert_no_crash(result)
    report = json.loads(result.stdout)
    assert report["failed"] == {}
    assert sum(report["applied"].values()) == expect_applied, report


@pytest.fixture
def reference(
    tmp_path: Path,
    project: Path,
    tiny_params: PipelineParams,
    data_dir: Path,
    template_db: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, object]:
    """What the recording looks like in a healthy store: `_content` of a clean run."""
    db = tmp_path / "reference.db"
    shutil.copy(template_db, db)
    uri = f"sqlite:///{db}"
    copy = tmp_path / "reference-project"
    shutil.copytree(project, copy)
    with monkeypatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        _record_run(copy, tiny_params, data_dir)
    return _content(uri)


@pytest.fixture
def lock_store(store: str) -> Iterator[Callable[[], None]]:
    """Hold ``BEGIN EXCLUSIVE`` on the store from another process; yields the release call."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(_db(store))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "locked"

    def release() -> None:
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.wait(timeout=30) == 0

    try:
        yield release
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.slow
def test_sqlite_store_locked_by_another_process(
    project: Path,
    tiny_params: PipelineParams,
    data_dir: Path,
    store: str,
    reference: dict[str, object],
    lock_store: Callable[[], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = time.monotonic()
    tracker = _record_run(project, tiny_params, data_dir)
    elapsed = time.monotonic() - started
    tries = [r for r in caplog.records if r.getMessage().startswith("MLflow unreachable")]
    # The run went on: every record is journaled and record.json is final, none reached MLflow.
    ops = tracker.journal.read_ops()
    assert tracker.journal.cursor() == 0 and ops[-1]["op"] == "end"
    record = json.loads((project / "artifacts/pretrain/record.json").read_text())
    assert record["status"] == "FINISHED" and len(record["checkpoints"]) == 2
    # Each try waits out SQLite's busy timeout (up to 20 s in MLflow); after a failure the
    # tracker backs off, so only the start and the end of the run try (not each checkpoint).
    assert len(tries) == 2 and "database is locked" in tries[0].getMessage()
    assert elapsed < 55, elapsed

    lock_store()
    _sync(expect_applied=len(ops))
    assert _content(store) == reference
    rows = _rows(_db(store))
    _sync(expect_applied=0)
    assert _rows(_db(store)) == rows


@pytest.mark.parametrize(
    ("rewind", "forget_ids"),
    [
        pytest.param(1.0, True, id="killed-before-any-cursor-or-id-was-saved"),
        pytest.param(0.5, False, id="killed-half-way-cursor-behind"),
        pytest.param(0.0, False, id="clean-repeat"),
    ],
)
def test_replaying_applied_operations_duplicates_nothing(
    project: Path,
    tiny_params: PipelineParams,
    data_dir: Path,
    store: str,
    rewind: float,
    forget_ids: bool,
) -> None:
    """A `tracking sync` (or a flush) SIGKILLed after MLflow applied operations but before the
    journal saved its cursor replays them; MLflow must end up with each record exactly once."""
    tracker: StageTracker = _record_run(project, tiny_params, data_dir)
    journal = tracker.journal
    total = len(journal.read_ops())
    assert journal.cursor() == total
    content, rows = _content(store), _rows(_db(store))

    behind = round(total * rewind)
    journal.set_cursor(total - behind)
    if forget_ids:
        journal.ids_path.unlink()
    _sync(expect_applied=behind)
    assert _content(store) == content
    assert _rows(_db(store)) == rows
    _sync(expect_applied=0)
    assert _rows(_db(store)) == rows


@pytest.mark.slow
def test_server_killed_and_restarted_mid_run_catches_up(
    project: Path,
    tiny_params: PipelineParams,
    data_dir: Path,
    reference: dict[str, object],
    mlflow_server: tuple[str, Callable[[], None], Callable[[], None]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    uri, start, stop = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    # Every metrics flush tries MLflow (the timed flush, without waiting 10 s between tries).
    monkeypatch.setattr(tracking, "FLUSH_EVERY_S", 0.0)
    start()
    actions = {1: stop, 3: start}  # down after step 1 (a flush fails), back before step 4
    tracker = _record_run(
        project, tiny_params, data_dir, on_step=lambda step: actions.get(step, lambda: None)()
    )
    tries = [r for r in caplog.records if r.getMessage().startswith("MLflow unreachable")]
    assert len(tries) == 1  # the step-2 flush; later ones waited out the back-off
    # The end of the run reached the restarted server: everything is in, with no manual sync.
    assert tracker.journal.cursor() == len(tracker.journal.read_ops())
    assert _content(uri) == reference
    _sync(expect_applied=0)
    assert _content(uri) == reference
