"""The MLflow side of the journal: `drain` applies its operations with an `MlflowClient`.

Each operation is idempotent (runs, models and versions are found again by key tags), so a
replay duplicates nothing. Checkpoint files become LoggedModel artifacts (hard links in a local
store, uploads to a server), and the embedded store keeps its artifact locations relative.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from openrelease.record.journal import EMBEDDED_DB, Journal

logger = logging.getLogger(__name__)

RUN_KEY_TAG = "openrelease.run_key"
MODEL_KEY_TAG = "openrelease.model_key"
EXPERIMENT = "openrelease"
EXPERIMENT_KIND = "custom_model_development"
"""``mlflow.experimentKind``: the UI opens the experiment on runs and models, not on traces."""
EMBEDDED_ARTIFACTS = "mlruns"
"""The embedded store's artifact root, relative to the project folder."""


def embedded_db(tracking_uri: str, project_dir: Path) -> Path | None:
    """The SQLite file when ``tracking_uri`` is the project's embedded store, else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    db = db if db.is_absolute() else project_dir / db
    return db if db.resolve() == (project_dir / EMBEDDED_DB).resolve() else None


def local_path(uri: str, project_dir: Path) -> Path | None:
    """The folder of a local artifact location (relative ones are under the project)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme:
        return None
    path = Path(uri)
    return path if path.is_absolute() else project_dir / path


def link_tree(src: Path, dest: Path) -> int:
    """Hard-link every file under ``src`` into ``dest`` (copy across filesystems)."""
    count = 0
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dest / f.relative_to(src)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)
        count += 1
    return count


class Applier:
    """Applies journal operations with an `MlflowClient`; each operation is idempotent."""

    def __init__(self, tracking_uri: str, ids: dict[str, str], project_dir: Path) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.uri = tracking_uri
        self.ids = ids
        self.project_dir = project_dir
        self._experiment_id: str | None = None

    def experiment_id(self) -> str:
        """The id of the `openrelease` experiment, created on first use.

        In the embedded store its artifact root is ``mlruns/<id>`` relative to the project
        (MLflow itself would store an absolute path), so moving the project keeps every artifact
        resolvable: MLflow resolves it against the folder it runs in, the project.
        """
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(EXPERIMENT)
            if exp is None:
                exp_id = self.client.create_experiment(
                    EXPERIMENT, tags={"mlflow.experimentKind": EXPERIMENT_KIND}
                )
            else:
                exp_id = exp.experiment_id
                if "mlflow.experimentKind" not in exp.tags:
                    self.client.set_experiment_tag(exp_id, "mlflow.experimentKind", EXPERIMENT_KIND)
            db = embedded_db(self.uri, self.project_dir)
            if db is not None:
                relativize_store(db, self.project_dir)
            self._experiment_id = exp_id
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
            case "model_input":
                self._log_model_input(op)
            case "model":
                self._ensure_model(op)
            case "model_tags":
                if model_id := self._model_id(op["model"]):
                    self.client.set_logged_model_tags(model_id, op["tags"])
            case "register":
                self._register(op)
            case "artifact":
                self._log_artifact(op)
            case "end":
                self.client.set_terminated(self.ids[op["run"]], op["status"], op["time"])
            case other:
                raise ValueError(f"unknown journal operation {other!r}")

    def _path(self, rel: str) -> Path:
        path = Path(rel)
        return path if path.is_absolute() else self.project_dir / path

    def _ensure_run(self, op: dict[str, Any]) -> None:
        key = op["key"]
        if key not in self.ids:
            found = self.client.search_runs(
                [self.experiment_id()],
                filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'",
                max_results=1,
            )
            if found:
                self.ids[key] = found[0].info.run_id
            else:
                tags = {RUN_KEY_TAG: key, **op.get("tags", {})}
                if op.get("parent"):
                    tags["mlflow.parentRunId"] = self.ids[op["parent"]]
                run = self.client.create_run(
                    self.experiment_id(), start_time=op["time"], tags=tags, run_name=op["name"]
                )
                self.ids[key] = run.info.run_id
                if op.get("params"):  # only at creation: params are immutable in MLflow
                    self._log_batch(key, params=op["params"])
                return
        if op.get("reopen"):  # a pipeline run a new stage continues, or a resumed stage run
            run_id = self.ids[key]
            info = self.client.get_run(run_id).info
            if info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            if info.run_name != op["name"]:
                self.client.update_run(run_id, name=op["name"])
            if op.get("tags"):
                self._log_batch(key, tags=op["tags"])

    def _log_batch(
        self,
        run_key: str,
        *,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        from mlflow.entities import Param, RunTag

        params_list = [Param(k, v) for k, v in (params or {}).items()]
        tags_list = [RunTag(k, v) for k, v in (tags or {}).items()]
        for i in range(0, max(len(params_list), len(tags_list)), 100):  # MLflow's batch limits
            self.client.log_batch(
                self.ids[run_key], params=params_list[i : i + 100], tags=tags_list[i : i + 100]
            )

    def _log_metrics(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        model_id = self._model_id(op["model"]) if op.get("model") else None
        metrics = [
            Metric(key, float(value), int(ts), int(step), model_id=model_id)
            for key, value, ts, step in op["metrics"]
        ]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.ids[op["run"]], metrics=metrics[i : i + 1000])

    def _find_model(self, filter_string: str) -> str | None:
        found = self.client.search_logged_models(
            [self.experiment_id()], filter_string=filter_string, max_results=1
        )
        return found[0].model_id if found else None

    def _model_id(self, key: str, digest: str | None = None) -> str | None:
        """The LoggedModel id of ``key`` (also another stage's), else of checkpoint ``digest``."""
        if key not in self.ids:
            model_id = self._find_model(f"tags.`{MODEL_KEY_TAG}` = '{key}'")
            if model_id is None and digest:
                model_id = self._find_model(f"tags.`checkpoint_digest` = '{digest}'")
            if model_id is None:
                return None
            self.ids[key] = model_id
        return self.ids[key]

    def _log_input(self, op: dict[str, Any]) -> None:
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        # MLflow caps dataset digests at 36 chars; the full sha256 travels in the input tags.
        dataset = MetaDataset(  # type: ignore[abstract]
            source=_dataset_source(op["source"]),
            name=op["name"],
            digest=op["digest"].removeprefix("sha256:")[:36],
        )
        tags = [InputTag(k, v) for k, v in op["tags"].items()]
        tags.append(InputTag("mlflow.data.context", op["context"]))
        self.client.log_inputs(
            self.ids[op["run"]], datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)]
        )

    def _log_model_input(self, op: dict[str, Any]) -> None:
        """A checkpoint this run starts from (or evaluates), as a LoggedModel input."""
        from mlflow.entities import LoggedModelInput

        model_id = self._model_id(op["model"], op.get("digest"))
        if model_id is None:  # made without a record (e.g. a replay): nothing to link
            logger.warning("no LoggedModel for %s; not linked as an input", op["model"])
            return
        run_id = self.ids[op["run"]]
        inputs = self.client.get_run(run_id).inputs
        if inputs and any(m.model_id == model_id for m in (inputs.model_inputs or [])):
            return
        self.client.log_inputs(run_id, models=[LoggedModelInput(model_id)])

    def _ensure_model(self, op: dict[str, Any]) -> None:
        """A release checkpoint as a LoggedModel whose artifacts are the checkpoint files.

        A local artifact store (the embedded default) gets hard links to the checkpoint files,
        so no byte is stored twice; a server's store gets them uploaded.
        """
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        key = op["key"]
        model_id = self.ids.get(key) or self._find_model(f"tags.`{MODEL_KEY_TAG}` = '{key}'")
        if model_id is None:
            model = self.client.create_logged_model(
                self.experiment_id(),
                name=op["name"],
                source_run_id=self.ids[op["run"]],
                tags={MODEL_KEY_TAG: key, **op["tags"]},
                params=op["params"],
                model_type="checkpoint",
            )
            model_id = model.model_id
        self.ids[key] = model_id
        model = self.client.get_logged_model(model_id)
        if str(model.status) != str(LoggedModelStatus.READY):
            folder = self._path(op["dir"])
            if folder.is_dir():
                dest = local_path(model.artifact_location, self.project_dir)
                if dest is not None:
                    link_tree(folder, dest)
                else:
                    self.client.log_model_artifacts(model_id, str(folder))
            else:
                logger.warning("%s is gone; LoggedModel %s has no artifacts", folder, model_id)
            self.client.finalize_logged_model(model_id, LoggedModelStatus.READY)
        run_id = self.ids[op["run"]]
        outputs = self.client.get_run(run_id).outputs
        if not any(m.model_id == model_id for m in (outputs.model_outputs if outputs else [])):
            self.client.log_outputs(run_id, [LoggedModelOutput(model_id, int(op["step"]))])

    def _register(self, op: dict[str, Any]) -> None:
        """Register a stage's final checkpoint in the Model Registry (one version per model)."""
        from mlflow.exceptions import MlflowException

        model_id = self._model_id(op["model"])
        if model_id is None:
            raise ValueError(f"no LoggedModel {op['model']} to register")
        name = op["name"]
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(
                name, description=op.get("description"), tags={"openrelease.stage": op["stage"]}
            )
        for version in self.client.search_model_versions(f"name = '{name}'"):
            if version.tags.get(MODEL_KEY_TAG) == op["model"]:
                return
        self.client.create_model_version(
            name,
            source=f"models:/{model_id}",
            run_id=self.ids[op["run"]],
            tags={MODEL_KEY_TAG: op["model"], **op["tags"]},
            model_id=model_id,
        )

    def _log_artifact(self, op: dict[str, Any]) -> None:
        run_id = self.ids[op["run"]]
        src = self._path(op["path"])
        dest = local_path(self.client.get_run(run_id).info.artifact_uri, self.project_dir)
        if dest is None:
            self.client.log_artifact(run_id, str(src), op.get("dir"))
            return
        folder = dest / op["dir"] if op.get("dir") else dest
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, folder / src.name)  # small files; a run's artifacts may be rewritten


def _dataset_source(source: dict[str, str]) -> Any:
    """The MLflow dataset source of a journaled input: a local file, a Hub dataset or code."""
    match source["type"]:
        case "local":
            from mlflow.data.dataset_source_registry import get_dataset_source_from_json

            # MLflow generates this class (LocalArtifactDatasetSource) at run time
            return get_dataset_source_from_json(json.dumps({"uri": source["uri"]}), "local")
        case "hugging_face":
            from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

            return HuggingFaceDatasetSource(path=source["path"], revision=source.get("revision"))
        case _:
            from mlflow.data.code_dataset_source import CodeDatasetSource

            return CodeDatasetSource(tags={"generator": source.get("name", "openrelease")})


_LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
)


def relativize_store(db: Path, project_dir: Path) -> int:
    """Make the embedded store's artifact locations under the project relative to it.

    MLflow's API makes every local artifact location absolute (its ``Default`` experiment too);
    the embedded store keeps ``mlruns/...`` instead, which MLflow resolves against the folder it
    runs in: the project. The one write into MLflow's tables; returns the rows it changed.
    """
    root = project_dir.resolve()
    prefixes = [root.as_uri() + "/", str(root) + "/"]
    changed = 0
    con = sqlite3.connect(db, timeout=30)
    try:
        with con:
            for table, column in _LOCATION_COLUMNS:
                for prefix in prefixes:
                    cur = con.execute(
                        f"UPDATE {table} SET {column} = substr({column}, ?) "
                        f"WHERE substr({column}, 1, ?) = ?",
                        (len(prefix) + 1, len(prefix), prefix),
                    )
                    changed += cur.rowcount
    except sqlite3.OperationalError as exc:  # a store without these tables: nothing to fix
        logger.debug("%s: %s", db, exc)
    finally:
        con.close()
    return changed


def drain(journal: Journal, tracking_uri: str, project_dir: Path) -> int:
    """Apply every pending operation; return how many were applied. Raises on MLflow errors."""
    if not journal.path.exists():
        return 0
    with journal.locked():
        ops = journal.read_ops()
        start = journal.cursor()
        if start >= len(ops):
            return 0
        applier = Applier(tracking_uri, journal.ids(), project_dir)
        done = start
        try:
            for op in ops[start:]:
                applier.apply(op)
                done += 1
        finally:
            journal.save_ids(applier.ids)
            journal.set_cursor(done)
        return done - start
