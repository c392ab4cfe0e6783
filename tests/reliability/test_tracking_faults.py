"""Tracking faults: nothing lost, nothing duplicated, training never stops for MLflow.

tests/test_tracking.py already kills a real `mlflow server` mid-run and syncs after a restart.
This file adds: the server restarted mid-run (the recorder catches up by itself), the SQLite store
held under an exclusive lock by another process, and a sync killed between MLflow applying
operations and the journal recording it (the replay must duplicate nothing).
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_checks import assert_no_crash, invoke
from test_tracking import _content, _record_run, mlflow_server, store

from openrelease.params import PipelineParams
from openrelease.record import recorder, tracking
from openrelease.record.journal import Journal, journal_dir
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
    tracker = _record_run(project, tiny_params, data_dir, send=False)  # the training process
    elapsed = time.monotonic() - started
    # The run never touched the store: every record is journaled and record.json is final.
    ops = tracker.journal.read_ops()
    assert tracker.journal.cursor() == 0 and ops[-1]["op"] == "end"
    record = json.loads((project / "artifacts/pretrain/record.json").read_text())
    assert record["status"] == "FINISHED" and len(record["checkpoints"]) == 2
    assert elapsed < 15, elapsed  # SQLite's busy timeout (20 s in MLflow) was never waited on
    # The recorder's send waits out the busy timeout once, warns and leaves the journal as is.
    tracker.send()
    tries = [r for r in caplog.records if r.getMessage().startswith("MLflow unreachable")]
    assert len(tries) == 1 and "database is locked" in tries[0].getMessage()
    assert tracker.journal.cursor() == 0

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


def _wait_for(what: Callable[[], bool], *, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


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
    """The recorder process's loop follows the journal through an outage and catches up."""
    uri, start, stop = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr(tracking, "FLUSH_EVERY_S", 0.0)  # every step reaches the journal
    monkeypatch.setattr(recorder, "RETRY_S", 0.5)
    start()
    key = tracking.stage_run_key(project, tiny_params, "pretrain")
    journal = Journal(journal_dir(project, key))
    done = threading.Event()
    caught_up: list[bool] = []
    follower = threading.Thread(
        target=lambda: caught_up.append(
            recorder.follow(
                project,
                key,
                tracking_uri=uri,
                record_path=project / "artifacts/pretrain/record.json",
                stop=done,
                poll_s=0.1,
            )
        )
    )
    follower.start()

    def tries() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("MLflow unreachable")]

    def down_after_sent() -> None:  # step 1 reached MLflow, then the server dies
        _wait_for(lambda: journal.cursor() == len(journal.read_ops()))
        stop()

    def up_after_a_failure() -> None:  # the recorder failed at least once, then it is back
        _wait_for(lambda: len(tries()) > 0)
        start()

    actions = {1: down_after_sent, 3: up_after_a_failure}
    tracker = _record_run(
        project,
        tiny_params,
        data_dir,
        on_step=lambda step: actions.get(step, lambda: None)(),
        send=False,
    )
    done.set()
    follower.join(timeout=120)
    assert caught_up == [True] and tries()
    # Everything reached the restarted server, with no manual sync; the ids are in record.json.
    assert tracker.journal.cursor() == len(tracker.journal.read_ops())
    assert _content(uri) == reference
    record = json.loads((project / "artifacts/pretrain/record.json").read_text())
    assert record["run_id"] == journal.ids()[key]
    _sync(expect_applied=0)
    assert _content(uri) == reference
