"""The write-ahead journal of MLflow operations and its idempotent replay into MLflow.

Every record goes to the journal first; `drain` applies pending operations in order and advances
a cursor, so an outage loses nothing and a replay (`openrelease tracking sync`) duplicates nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from openrelease.manifest import read_json, write_json

logger = logging.getLogger(__name__)

RUN_KEY_TAG = "openrelease.run_key"
MODEL_KEY_TAG = "openrelease.model_key"
EXPERIMENT = "openrelease"
JOURNALS = Path(".openrelease") / "journal"
"""Where a project keeps its journals, one folder per stage run."""


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

    def append(self, ops: list[dict[str, Any]]) -> None:
        """Append operations durably (one fsync per call)."""
        if not ops:
            return
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(op, sort_keys=True, allow_nan=True) + "\n" for op in ops)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def read_ops(self) -> list[dict[str, Any]]:
        """All complete operations; a torn last line (killed mid-write) is ignored."""
        if not self.path.exists():
            return []
        ops = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
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

    def ids(self) -> dict[str, str]:
        """Journal keys (runs, models) mapped to MLflow ids."""
        return dict(read_json(self.ids_path)) if self.ids_path.exists() else {}

    def save_ids(self, ids: dict[str, str]) -> None:
        """Persist the key -> id map."""
        write_json(self.ids_path, ids)


class Applier:
    """Applies journal operations with an `MlflowClient`; each operation is idempotent."""

    def __init__(self, tracking_uri: str, ids: dict[str, str]) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.ids = ids
        self._experiment_id: str | None = None

    def experiment_id(self) -> str:
        """The id of the `openrelease` experiment, created on first use."""
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(EXPERIMENT)
            self._experiment_id = (
                exp.experiment_id if exp is not None else self.client.create_experiment(EXPERIMENT)
            )
        return self._experiment_id

    def apply(self, op: dict[str, Any]) -> None:
        """Apply one operation (see `Journal`); safe to repeat."""
        match op["op"]:
            case "run":
                self._ensure_run(op)
            case "params":
                self._log_batch(op["run"], params=op["params"])
            case "tags":
                self._log_batch(op["run"], tags=op["tags"])
            case "metrics":
                self._log_metrics(op)
            case "input":
                self._log_input(op)
            case "model":
                self._ensure_model(op)
            case "artifact":
                self.client.log_artifact(self.ids[op["run"]], op["path"], op.get("dir"))
            case "end":
                self.client.set_terminated(self.ids[op["run"]], op["status"], op["time"])
            case other:
                raise ValueError(f"unknown journal operation {other!r}")

    def _ensure_run(self, op: dict[str, Any]) -> None:
        key = op["key"]
        if key in self.ids:
            return
        found = self.client.search_runs(
            [self.experiment_id()], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1
        )
        if found:
            self.ids[key] = found[0].info.run_id
            return
        tags = {RUN_KEY_TAG: key, **op.get("tags", {})}
        if op.get("parent"):
            tags["mlflow.parentRunId"] = self.ids[op["parent"]]
        run = self.client.create_run(
            self.experiment_id(), start_time=op["time"], tags=tags, run_name=op["name"]
        )
        self.ids[key] = run.info.run_id

    def _log_batch(
        self,
        run_key: str,
        *,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        from mlflow.entities import Param, RunTag

        self.client.log_batch(
            self.ids[run_key],
            params=[Param(k, v) for k, v in (params or {}).items()],
            tags=[RunTag(k, v) for k, v in (tags or {}).items()],
        )

    def _log_metrics(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        model_id = self._model_id(op["model"]) if op.get("model") else None
        metrics = [
            Metric(key, float(value), int(ts), int(step), model_id=model_id)
            for key, value, ts, step in op["metrics"]
        ]
        self.client.log_batch(self.ids[op["run"]], metrics=metrics)

    def _model_id(self, key: str) -> str | None:
        """The LoggedModel id of ``key``, also when another stage's journal created it."""
        if key not in self.ids:
            found = self.client.search_logged_models(
                [self.experiment_id()],
                filter_string=f"tags.`{MODEL_KEY_TAG}` = '{key}'",
                max_results=1,
            )
            if not found:
                return None
            self.ids[key] = found[0].model_id
        return self.ids[key]

    def _log_input(self, op: dict[str, Any]) -> None:
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        # MLflow caps dataset digests at 36 chars; the full sha256 travels in the input tags.
        source = HTTPDatasetSource(url=op["source"])  # type: ignore[no-untyped-call]
        dataset = MetaDataset(  # type: ignore[abstract]
            source=source, name=op["name"], digest=op["digest"].removeprefix("sha256:")[:36]
        )
        tags = [InputTag(k, v) for k, v in op["tags"].items()]
        tags.append(InputTag("mlflow.data.context", op["context"]))
        self.client.log_inputs(
            self.ids[op["run"]], datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)]
        )

    def _ensure_model(self, op: dict[str, Any]) -> None:
        from mlflow.entities import LoggedModelStatus

        key = op["key"]
        if key in self.ids:
            return
        found = self.client.search_logged_models(
            [self.experiment_id()],
            filter_string=f"tags.`{MODEL_KEY_TAG}` = '{key}'",
            max_results=1,
        )
        if found:
            self.ids[key] = found[0].model_id
            return
        model = self.client.create_logged_model(
            self.experiment_id(),
            name=op["name"],
            source_run_id=self.ids[op["run"]],
            tags={MODEL_KEY_TAG: key, **op["tags"]},
            params=op["params"],
            model_type="checkpoint",
        )
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        self.ids[key] = model.model_id


def drain(journal: Journal, tracking_uri: str) -> int:
    """Apply every pending operation; return how many were applied. Raises on MLflow errors."""
    ops = journal.read_ops()
    start = journal.cursor()
    if start >= len(ops):
        return 0
    applier = Applier(tracking_uri, journal.ids())
    done = start
    try:
        for op in ops[start:]:
            applier.apply(op)
            done += 1
    finally:
        journal.save_ids(applier.ids)
        journal.set_cursor(done)
    return done - start


def now_ms() -> int:
    """Wall-clock time in milliseconds, as MLflow stores it."""
    return int(time.time() * 1000)
