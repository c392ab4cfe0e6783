"""The write-ahead journal of MLflow operations: an append-only file, a cursor, an id map.

Every record goes to the journal first; `openrelease.record.applier.drain` applies pending
operations to MLflow in order and advances the cursor, so an outage loses nothing and a replay
(`openrelease tracking sync`) duplicates nothing. This module never imports mlflow: the training
process appends here and a recorder process (`openrelease.record.recorder`) drains. Paths in
operations are relative to the project folder, so a journal survives moving the project.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from openrelease.manifest import read_json, write_json

logger = logging.getLogger(__name__)

JOURNALS = Path(".openrelease") / "journal"
"""Where a project keeps its journals, one folder per stage run."""
EMBEDDED_DB = "mlflow.db"
"""The embedded SQLite store, in the project folder."""


def journal_dir(project_dir: Path, run_key: str) -> Path:
    """The journal folder of run ``run_key`` (also holds its pip freeze and git diff)."""
    return project_dir / JOURNALS / run_key.replace(":", "-")


class Journal:
    """An append-only JSONL file of operations plus a cursor and a key->id map beside it."""

    def __init__(self, journal_dir: Path) -> None:
        self.journal_dir = journal_dir
        self.path = journal_dir / "journal.jsonl"
        self.cursor_path = journal_dir / "cursor.json"
        self.ids_path = journal_dir / "ids.json"
        self.lock_path = journal_dir / "drain.lock"
        self._checked_tail = False

    def append(self, ops: list[dict[str, Any]]) -> None:
        """Append operations durably (one fsync per call).

        A line torn by a killed writer is closed first, so it never swallows the next operation.
        """
        if not ops:
            return
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(op, sort_keys=True, allow_nan=True) + "\n" for op in ops)
        with self.path.open("a+b") as f:
            if not self._checked_tail:
                self._checked_tail = True
                if f.seek(0, os.SEEK_END) > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        data = "\n" + data
            f.write(data.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def read_ops(self) -> list[dict[str, Any]]:
        """All complete operations.

        A torn line (a writer killed mid-write) is skipped; an unterminated last line is a write
        in progress and is left for the next read.
        """
        if not self.path.exists():
            return []
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        ops = []
        for line in lines[:-1]:  # the part after the last newline is not complete yet
            if not line:
                continue
            try:
                ops.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s: skipping a torn journal line", self.path)
        return ops

    def cursor(self) -> int:
        """Number of operations already applied to MLflow."""
        return int(read_json(self.cursor_path)["applied"]) if self.cursor_path.exists() else 0

    def set_cursor(self, applied: int) -> None:
        """Record that the first ``applied`` operations reached MLflow."""
        write_json(self.cursor_path, {"applied": applied})

    def pending(self) -> int:
        """Operations not applied yet."""
        return max(0, len(self.read_ops()) - self.cursor())

    def ids(self) -> dict[str, str]:
        """Journal keys (runs, models) mapped to MLflow ids."""
        try:
            return dict(read_json(self.ids_path)) if self.ids_path.exists() else {}
        except (OSError, ValueError):  # being replaced by a drain right now
            return {}

    def save_ids(self, ids: dict[str, str]) -> None:
        """Persist the key -> id map."""
        write_json(self.ids_path, ids)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the journal's drain lock (one drain at a time, across processes)."""
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        with self.lock_path.open("a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def now_ms() -> int:
    """Wall-clock time in milliseconds, as MLflow stores it."""
    return int(time.time() * 1000)
