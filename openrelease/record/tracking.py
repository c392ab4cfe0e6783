"""The provenance record of a stage: MLflow runs (through the journal) and ``record.json``.

Only rank 0 records, and only to the journal and ``record.json``: this module never imports
mlflow, so a training process never waits on it. A recorder process (`openrelease.record.recorder`,
started by `openrelease launch`) or `sync_journals` (`openrelease tracking sync`) sends the journal
to MLflow; if MLflow is unreachable, operations stay in the journal for later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from openrelease.digest import sha256_file, sha256_json
from openrelease.layout import RECORD
from openrelease.manifest import (
    CheckpointMeta,
    GitInfo,
    InputRecord,
    StageRecord,
    dump_json,
    write_json,
    write_text_atomic,
)
from openrelease.params import PipelineParams
from openrelease.record.fingerprint import fingerprint
from openrelease.record.journal import EMBEDDED_DB, JOURNALS, Journal, journal_dir, now_ms
from openrelease.record.runinfo import (
    checkpoint_model_key,
    dataset_source,
    dvc_experiment,
    environment_info,
    flatten,
    git_info,
    git_output,
    model_key,
    pip_freeze,
    pipeline_step,
    registered_name,
    source_tags,
)
from openrelease.secrets import redact

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = f"sqlite:///{EMBEDDED_DB}"
FLUSH_EVERY_S = 10.0
"""How often buffered metrics reach the journal (checkpoints, start and end go at once)."""
MODEL_INPUT_KINDS = ("checkpoint", "reference-checkpoint")
"""Inputs that are release checkpoints: linked as LoggedModel inputs, not datasets."""


def tracking_uri(project_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the embedded SQLite store in the project."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(project_dir / EMBEDDED_DB).resolve()}"


def portable_uri(uri: str, project_dir: Path) -> str:
    """``uri`` as a record keeps it: the embedded store relative to the project, else as is."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = Path(uri.removeprefix(prefix))
        root = project_dir.resolve()
        if path.is_absolute() and path.is_relative_to(root):
            return prefix + path.relative_to(root).as_posix()
    return uri


def ui_uri(project_dir: Path) -> str:
    """The store URI to open the record with, from the project folder (redacted).

    The embedded store is ``sqlite:///mlflow.db``, relative, because its artifact locations are
    relative to the project too.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return redact(uri) if uri else DEFAULT_TRACKING_URI


def pipeline_key(project_dir: Path, params: PipelineParams) -> str:
    """Groups the stage runs of one pipeline run under one parent.

    ``OPENRELEASE_PIPELINE_RUN`` names it explicitly; otherwise it is the (git commit, params)
    pair, so every stage that `dvc repro` runs for the same code and params shares a parent.
    """
    explicit = os.environ.get("OPENRELEASE_PIPELINE_RUN")
    if explicit:
        return "pipeline-" + hashlib.sha256(explicit.encode()).hexdigest()[:16]
    commit = (git_output(project_dir, "rev-parse", "HEAD") or "no-git").strip()
    body = sha256_json({"commit": commit, "params": params.model_dump(mode="json")})
    return "pipeline-" + body.removeprefix("sha256:")[:16]


def stage_run_key(project_dir: Path, params: PipelineParams, stage: str) -> str:
    """The journal key of ``stage``'s run in this pipeline (the launcher's recorder needs it)."""
    return f"{pipeline_key(project_dir, params)}:{stage}"


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


class StageTracker:
    """Records one stage run. Construct on every rank; only ``enabled`` (rank 0) writes.

    Everything goes to the journal (``.openrelease/journal/<run>/``) and ``record.json``; no
    method imports mlflow or waits on it.
    """

    def __init__(
        self,
        stage: str,
        *,
        params: PipelineParams,
        project_dir: Path,
        out_dir: Path,
        enabled: bool = True,
        world_size: int = 1,
        num_threads: int = 1,
    ) -> None:
        self.stage = stage
        self.params = params
        self.project_dir = project_dir
        self.out_dir = out_dir
        self.enabled = enabled
        self.uri = tracking_uri(project_dir)
        self.pipeline_key = pipeline_key(project_dir, params)
        self.run_key = f"{self.pipeline_key}:{stage}"
        self.journal = Journal(journal_dir(project_dir, self.run_key))
        self._pending: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        self._started_ms = now_ms()
        self._world_size, self._num_threads = world_size, num_threads
        self._inputs: tuple[InputRecord, ...] = ()
        self._checkpoints: list[CheckpointMeta] = []
        self._final: dict[str, float] = {}
        self._logged: set[tuple[str, str | None, str, int, float]] | None = None
        self._git: GitInfo | None = None
        self._env: dict[str, str] = {}
        self._fingerprint: dict[str, str] = {}

    def _rel(self, path: Path) -> str:
        """``path`` relative to the project (the journal and record move with it)."""
        root = self.project_dir.resolve()
        full = path.resolve()
        return full.relative_to(root).as_posix() if full.is_relative_to(root) else str(full)

    def _stage_params(self) -> dict[str, Any]:
        dumped = self.params.model_dump(mode="json")
        sections = {"data": ["seed", "data"], "eval": ["seed", "eval"]}.get(
            self.stage, ["seed", "compute", "model", self.stage]
        )
        return {k: dumped[k] for k in sections if k in dumped}

    def _pipeline_run_op(self, source: dict[str, str]) -> dict[str, Any]:
        """The parent run, reopened by each stage.

        It is named after the DVC experiment and its overrides and carries the whole params,
        so pipelines compare side by side.
        """
        exp_name, overrides = dvc_experiment(self.project_dir)
        label = exp_name or f"pipeline {self.pipeline_key[9:17]}"
        if overrides:
            label += " (" + ", ".join(f"{k}={v}" for k, v in overrides.items()) + ")"
        tags = {"openrelease.kind": "pipeline", **source}
        tags["mlflow.source.name"] = "dvc repro"
        if exp_name:
            tags["dvc.exp_name"] = exp_name
        if os.environ.get("DVC_EXP_BASELINE_REV"):
            tags["dvc.exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
        if overrides:
            tags["dvc.exp_overrides"] = redact(" ".join(f"{k}={v}" for k, v in overrides.items()))
        return {
            "op": "run",
            "key": self.pipeline_key,
            "name": label[:250],
            "time": self._started_ms,
            "tags": tags,
            "params": flatten(self.params.model_dump(mode="json")),
            "reopen": True,
        }

    def start(self, inputs: list[InputRecord]) -> None:
        """Open the parent and child runs and record params, code, environment and inputs."""
        if not self.enabled:
            return
        self._inputs = tuple(inputs)
        self._git = git_info(self.project_dir, self.journal.journal_dir)
        self._env = environment_info(world_size=self._world_size, num_threads=self._num_threads)
        compute = self.params.compute
        self._fingerprint = fingerprint(
            world_size=self._world_size, nnodes=compute.nnodes, mode=compute.determinism
        )
        freeze_path = self.journal.journal_dir / "pip-freeze.txt"
        write_text_atomic(freeze_path, pip_freeze())
        params_path = self.journal.journal_dir / "params.resolved.json"
        write_text_atomic(params_path, redact(dump_json(self.params.model_dump(mode="json"))))
        stage_params = self._stage_params()
        source = source_tags(self.project_dir, self.stage, self._git)
        tags = {
            **source,
            "openrelease.stage": self.stage,
            "dvc.stage": self.stage,
            "openrelease.pipeline_key": self.pipeline_key,
            "openrelease.params_digest": sha256_json(stage_params),
            "openrelease.git_dirty": str(self._git.dirty).lower(),
            **{f"env.{k}": redact(v) for k, v in self._env.items()},
            **{f"fingerprint.{k}": redact(v)[:5000] for k, v in self._fingerprint.items()},
        }
        if self._git.experiment is not None:
            tags["openrelease.dvc_experiment"] = self._git.experiment
            tags["openrelease.dvc_overrides"] = json.dumps(self._git.overrides, sort_keys=True)[
                :5000
            ]
        ops: list[dict[str, Any]] = [
            self._pipeline_run_op(source),
            {
                "op": "run",
                "key": self.run_key,
                "parent": self.pipeline_key,
                "name": self.stage,
                "time": self._started_ms,
                "tags": {"openrelease.kind": "stage"},
                "reopen": True,  # a resumed stage continues its run
            },
            {"op": "params", "run": self.run_key, "params": flatten(stage_params)},
            {"op": "tags", "run": self.run_key, "tags": tags},
            {
                "op": "artifact",
                "run": self.run_key,
                "path": self._rel(params_path),
                "dir": "params",
            },
            {
                "op": "artifact",
                "run": self.run_key,
                "path": self._rel(freeze_path),
                "dir": "environment",
            },
        ]
        lock = self.project_dir / "dvc.lock"
        if lock.is_file():  # the lock as this stage starts: the hashes of every stage upstream
            tags["dvc.lock_sha256"] = sha256_file(lock)
            ops.append(
                {"op": "artifact", "run": self.run_key, "path": self._rel(lock), "dir": "dvc"}
            )
        if self._git.dirty:
            diff = self.journal.journal_dir / "git.diff"
            ops.append(
                {"op": "artifact", "run": self.run_key, "path": self._rel(diff), "dir": "code"}
            )
        ops += [self._input_op(i) for i in inputs]
        self._pending += ops
        self.flush()

    def _input_op(self, i: InputRecord) -> dict[str, Any]:
        """A dataset input (with its MLflow source), or a LoggedModel input for a checkpoint."""
        if i.kind in MODEL_INPUT_KINDS:
            key = checkpoint_model_key(self.project_dir, i.path)
            return {
                "op": "model_input",
                "run": self.run_key,
                "model": key or f"digest:{i.digest}",
                "digest": i.digest,
            }
        return {
            "op": "input",
            "run": self.run_key,
            "name": i.name,
            "digest": i.digest,
            "source": dataset_source(i.path),
            "context": i.kind,
            "tags": {"sha256": i.digest, "path": i.path},
        }

    def log_model_input(self, key: str, digest: str) -> None:
        """Link LoggedModel ``key`` (a checkpoint of any stage) as an input of this run."""
        if self.enabled:
            self._pending.append(
                {"op": "model_input", "run": self.run_key, "model": key, "digest": digest}
            )

    def _new_metrics(
        self, metrics: dict[str, float], *, step: int, model: str | None, run: str
    ) -> list[list[Any]]:
        """``[key, value, ts, step]`` rows not journaled before for ``run``.

        A resumed stage re-runs the steps after its last state and, being deterministic, gets
        the values already logged before the kill; they are not sent twice.
        """
        if self._logged is None:
            self._logged = {
                (op["run"], op.get("model"), k, int(st), float(v))
                for op in self.journal.read_ops()
                if op.get("op") == "metrics"
                for k, v, _, st in op["metrics"]
            }
        ts, rows = now_ms(), []
        for k, v in metrics.items():
            seen = (run, model, k, step, float(v))
            if seen not in self._logged:
                self._logged.add(seen)
                rows.append([k, float(v), ts, step])
        return rows

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        """Buffer per-step metrics; they reach the journal in batches."""
        if not self.enabled:
            return
        self._final.update({k: float(v) for k, v in metrics.items()})
        if rows := self._new_metrics(metrics, step=step, model=None, run=self.run_key):
            self._pending.append({"op": "metrics", "run": self.run_key, "metrics": rows})
        if time.monotonic() - self._last_flush >= FLUSH_EVERY_S:
            self.flush()

    def log_model_metrics(
        self,
        model_key: str,
        metrics: dict[str, float],
        *,
        step: int,
        pipeline: bool = False,
        final: bool = False,
    ) -> None:
        """Log ``metrics`` linked to the LoggedModel ``model_key`` (any stage's).

        They go on this run, or on the parent with ``pipeline``; ``final`` also puts them in
        record.json.
        """
        if not self.enabled:
            return
        run = self.pipeline_key if pipeline else self.run_key
        if final:
            self._final.update({k: float(v) for k, v in metrics.items()})
        if rows := self._new_metrics(metrics, step=step, model=model_key, run=run):
            self._pending.append({"op": "metrics", "run": run, "model": model_key, "metrics": rows})

    def log_pipeline_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        """Log ``metrics`` on the pipeline (parent) run."""
        if not self.enabled:
            return
        run = self.pipeline_key
        if rows := self._new_metrics(metrics, step=step, model=None, run=run):
            self._pending.append({"op": "metrics", "run": run, "metrics": rows})

    def tag_model(self, model_key: str, tags: dict[str, str]) -> None:
        """Set ``tags`` on the LoggedModel ``model_key`` (any stage's), e.g. eval settings."""
        if self.enabled:
            self._pending.append({"op": "model_tags", "model": model_key, "tags": tags})

    def log_checkpoint(self, meta: CheckpointMeta, *, path: Path) -> None:
        """Record a release checkpoint as an MLflow LoggedModel whose artifacts are its files.

        The recorder hard-links the files into a local artifact store (no byte stored twice)
        or uploads them to a server's.
        """
        if not self.enabled:
            return
        self._checkpoints = [c for c in self._checkpoints if c.step != meta.step] + [meta]
        key = model_key(self.run_key, meta.step)
        rel = self._rel(path)
        tags = {
            "path": rel,
            "stage": meta.stage,
            "step": str(meta.step),
            "tokens_seen": str(meta.tokens_seen),
            "pipeline_step": str(pipeline_step(self.params, meta.stage, meta.step)),
            "checkpoint_digest": meta.checkpoint_digest,
            "sample_range": f"{meta.sample_range[0]}-{meta.sample_range[1]}",
            "data_digest": meta.data_digest,
            "parent_digest": meta.parent_digest or "none",
        }
        tags.update({f"sha256.{f.path}"[:250]: f.sha256 for f in meta.files})
        self._pending.append(
            {
                "op": "model",
                "run": self.run_key,
                "key": key,
                "name": f"{meta.stage}-step{meta.step}",
                "dir": rel,
                "step": meta.step,
                "tags": tags,
                "params": {"step": str(meta.step), "stage": meta.stage},
            }
        )
        if meta.loss is not None:
            self.log_model_metrics(key, {"checkpoint_loss": meta.loss}, step=meta.step)
        self.flush()

    def flush(self) -> None:
        """Journal pending operations (one fsync) and rewrite record.json.

        Never waits on MLflow: the recorder sends the journal.
        """
        if not self.enabled:
            return
        self.journal.append(self._pending)
        self._pending = []
        self._last_flush = time.monotonic()
        self.write_record(status="RUNNING")

    def finish(self, *, status: str = "FINISHED") -> StageRecord | None:
        """Close the run and write the final record.json.

        The pipeline run ends with the same status (as far as it got); a finished training
        stage registers its final checkpoint.
        """
        if not self.enabled:
            return None
        if status == "FINISHED" and self.stage in self.params.train_stages and self._checkpoints:
            final = max(self._checkpoints, key=lambda c: c.step)
            self._pending.append(
                {
                    "op": "register",
                    "run": self.run_key,
                    "model": model_key(self.run_key, final.step),
                    "name": registered_name(self.params, self.stage),
                    "stage": self.stage,
                    "description": f"The final {self.stage} checkpoint of "
                    f"{self.params.release.name}.",
                    "tags": {
                        "sha256": final.checkpoint_digest,
                        "step": str(final.step),
                        "tokens": str(final.tokens_seen),
                    },
                }
            )
        end = now_ms()
        self._pending.append({"op": "end", "run": self.run_key, "status": status, "time": end})
        self._pending.append({"op": "end", "run": self.pipeline_key, "status": status, "time": end})
        self.flush()
        return self.write_record(status=status, finished=True)

    def send(self) -> None:
        """Send the journal to MLflow now, in this process (data and eval, which do not train).

        Logs a warning when MLflow is unreachable; the journal keeps the record.
        """
        if not self.enabled:
            return
        from openrelease.record.recorder import send_quietly

        send_quietly(
            self.project_dir,
            self.run_key,
            tracking_uri=self.uri,
            record_path=self.out_dir / RECORD,
        )

    def write_record(self, *, status: str, finished: bool = False) -> StageRecord:
        """Write ``record.json`` beside the stage outputs from what was recorded so far."""
        ids = self.journal.ids()
        record = StageRecord(
            stage=self.stage,
            pipeline_key=self.pipeline_key,
            run_key=self.run_key,
            run_id=ids.get(self.run_key),
            parent_run_id=ids.get(self.pipeline_key),
            tracking_uri=redact(portable_uri(self.uri, self.project_dir)),
            params=self._stage_params(),
            params_digest=sha256_json(self._stage_params()),
            seed=self.params.seed,
            git=self._git or GitInfo(commit=None, dirty=False, diff_sha256=None),
            environment=self._env,
            fingerprint=self._fingerprint,
            inputs=self._inputs,
            checkpoints=tuple(self._checkpoints),
            final_metrics=self._final,
            started=_iso(self._started_ms),
            finished=_iso(now_ms()) if finished else None,
            status=status,
        )
        write_json(self.out_dir / RECORD, record)
        return record


class SyncReport(BaseModel):
    """What `sync_journals` applied per journal, and which ones still fail."""

    model_config = ConfigDict(frozen=True)
    applied: dict[str, int]
    failed: dict[str, str]


def _first_time(journal: Journal) -> int:
    ops = journal.read_ops()
    return int(ops[0].get("time", 0)) if ops else 0


def sync_journals(project_dir: Path) -> SyncReport:
    """Replay every journal under ``.openrelease/journal`` into MLflow (idempotent).

    Journals go in the order their runs started, so a stage's checkpoints exist as LoggedModels
    before the next stage links them as inputs.
    """
    from openrelease.record.applier import drain

    uri = tracking_uri(project_dir)
    applied: dict[str, int] = {}
    failed: dict[str, str] = {}
    root = project_dir / JOURNALS
    journals = [Journal(p) for p in root.glob("*") if p.is_dir()]
    for journal in sorted(journals, key=lambda j: (_first_time(j), j.journal_dir.name)):
        folder = journal.journal_dir
        try:
            applied[folder.name] = drain(journal, uri, project_dir)
        except Exception as exc:  # report per journal; the others may still sync
            failed[folder.name] = f"{type(exc).__name__}: {redact(str(exc))[:200]}"
    return SyncReport(applied=applied, failed=failed)


def input_for_file(name: str, kind: str, path: Path, project_dir: Path) -> InputRecord:
    """An input record for a file, digested now."""
    return InputRecord(
        name=name,
        kind=kind,
        path=path.relative_to(project_dir).as_posix(),
        digest=sha256_file(path),
    )
