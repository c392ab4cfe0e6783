"""The recorder: the process that sends a stage's journal to MLflow while the stage trains.

A training process only appends to its journal (`openrelease.record.tracking`); it never imports
mlflow. `openrelease launch <stage>` starts the trainer and, beside it, a recorder process
(``python -m openrelease.record.recorder``, at low CPU priority) that follows the stage's journal
and drains it into MLflow as it grows. When the trainer exits, the launcher stops the recorder,
which drains what is left, writes the MLflow run ids into ``record.json`` and exits. If MLflow is
unreachable the recorder backs off and the journal keeps everything for `openrelease tracking
sync`; the stage's exit code is always the trainer's.

Stages that do not train (data, eval) send their journal in-process at the end (`send`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from openrelease.manifest import StageRecord, read_model, write_json
from openrelease.record.applier import drain
from openrelease.record.journal import Journal, journal_dir
from openrelease.secrets import redact

logger = logging.getLogger(__name__)

POLL_S = 2.0
"""How often the recorder looks for new journal operations."""
RETRY_S, RETRY_MAX_S = 30.0, 600.0
"""While MLflow is unreachable, retry after 30 s, doubling up to 10 min."""
STOP_TIMEOUT_S = 600.0
"""How long the launcher waits for the recorder's last drain before leaving it to `sync`."""
NICE = 10
"""The recorder's CPU priority (lower than the trainer's): it never slows training down."""


def update_record_ids(record_path: Path, journal: Journal, *, run_key: str) -> None:
    """Write the MLflow run ids the journal learned into ``record.json`` (if they changed)."""
    if not record_path.is_file():
        return
    record = read_model(record_path, StageRecord)
    if record.run_key != run_key:
        return
    ids = journal.ids()
    update = {"run_id": ids.get(record.run_key), "parent_run_id": ids.get(record.pipeline_key)}
    if all(v is None for v in update.values()):
        return
    if update != {"run_id": record.run_id, "parent_run_id": record.parent_run_id}:
        write_json(record_path, record.model_copy(update=update))


def send(project_dir: Path, run_key: str, *, tracking_uri: str, record_path: Path) -> int:
    """Drain run ``run_key``'s journal into MLflow now and put the run ids in ``record.json``.

    Raises:
        Exception: Whatever MLflow raised; the journal keeps the operations not applied.
    """
    journal = Journal(journal_dir(project_dir, run_key))
    applied = drain(journal, tracking_uri, project_dir)
    update_record_ids(record_path, journal, run_key=run_key)
    return applied


def send_quietly(project_dir: Path, run_key: str, *, tracking_uri: str, record_path: Path) -> None:
    """`send`, logging a warning instead of raising when MLflow is unreachable."""
    try:
        send(project_dir, run_key, tracking_uri=tracking_uri, record_path=record_path)
    except Exception as exc:  # the journal keeps it: `openrelease tracking sync` later
        _warn(exc)


def _warn(exc: BaseException) -> None:
    logger.warning(
        "MLflow unreachable (%s: %s); the journal keeps the record, run "
        "`openrelease tracking sync` later",
        type(exc).__name__,
        redact(str(exc))[:200],
    )


def follow(
    project_dir: Path,
    run_key: str,
    *,
    tracking_uri: str,
    record_path: Path,
    stop: threading.Event,
    poll_s: float = POLL_S,
) -> bool:
    """Drain the journal as it grows until ``stop`` is set, then drain what is left.

    Returns:
        True when everything journaled reached MLflow.
    """
    journal = Journal(journal_dir(project_dir, run_key))
    seen_size, retry_at, retry_s = -1, 0.0, RETRY_S
    while not stop.wait(poll_s):
        size = journal.path.stat().st_size if journal.path.exists() else 0
        if size == seen_size or time.monotonic() < retry_at:
            continue
        try:
            drain(journal, tracking_uri, project_dir)
        except Exception as exc:  # MLflow down: back off, the journal keeps everything
            _warn(exc)
            retry_at, retry_s = time.monotonic() + retry_s, min(2 * retry_s, RETRY_MAX_S)
        else:
            seen_size, retry_s = size, RETRY_S
    try:
        send(project_dir, run_key, tracking_uri=tracking_uri, record_path=record_path)
    except Exception as exc:  # left for `tracking sync`
        _warn(exc)
        return False
    return True


def start_recorder(
    project_dir: Path, run_key: str, *, tracking_uri: str, record_path: Path
) -> subprocess.Popen[bytes]:
    """Start a recorder process for run ``run_key`` (stop it with `stop_recorder`)."""
    argv = [
        sys.executable,
        "-m",
        "openrelease.record.recorder",
        "--project",
        str(project_dir),
        "--run-key",
        run_key,
        "--record",
        str(record_path),
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    return subprocess.Popen(argv, env=env, preexec_fn=lambda: os.nice(NICE))


def stop_recorder(proc: subprocess.Popen[bytes], *, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Ask the recorder to send what is left and exit; wait for it (bounded)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("the MLflow recorder did not finish; `openrelease tracking sync` later")
        proc.kill()
        proc.wait()


def run_recorded(
    argv: Sequence[str],
    *,
    env: dict[str, str],
    project_dir: Path,
    run_key: str,
    tracking_uri: str,
    record_path: Path,
) -> int:
    """Run the trainer ``argv`` with a recorder beside it; return the trainer's exit code."""
    recorder = start_recorder(
        project_dir, run_key, tracking_uri=tracking_uri, record_path=record_path
    )
    try:
        return subprocess.call(list(argv), env=env)
    finally:
        stop_recorder(recorder)


def main(args: Sequence[str] | None = None) -> int:
    """The recorder process: follow one run's journal until SIGTERM/SIGINT, then finish."""
    ap = argparse.ArgumentParser(prog="python -m openrelease.record.recorder")
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--run-key", required=True)
    ap.add_argument("--record", type=Path, required=True)
    ns = ap.parse_args(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    follow(ns.project, ns.run_key, tracking_uri=uri, record_path=ns.record, stop=stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
