"""The provenance record of a stage: MLflow runs (through the journal) and ``record.json``.

Only rank 0 records. If MLflow is unreachable, training goes on: operations stay in the journal
and `sync_journals` (`openrelease tracking sync`) replays them later.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from openrelease.digest import sha256_bytes, sha256_file, sha256_json
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
from openrelease.record.journal import JOURNALS, Journal, drain, journal_dir, now_ms
from openrelease.secrets import redact

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
FLUSH_EVERY_S = 10.0
OFFLINE_RETRY_S, OFFLINE_RETRY_MAX_S = 30.0, 600.0
"""While MLflow is unreachable, retry after 30 s, doubling up to 10 min: a locked SQLite store
blocks each attempt for MLflow's 20 s busy timeout, and training must not wait on it."""
_ENV_KEPT = (
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NCCL_ALGO",
    "NCCL_PROTO",
    "CUBLAS_WORKSPACE_CONFIG",
    "PYTHONHASHSEED",
)


def tracking_uri(project_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the embedded SQLite store in the project."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(project_dir / 'mlflow.db').resolve()}"


def _git(project_dir: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", *args], cwd=project_dir, capture_output=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.decode("utf-8", "replace") if proc.returncode == 0 else None


def git_info(project_dir: Path, journal_dir: Path) -> GitInfo:
    """Commit and dirtiness; a dirty tree's diff is saved beside the journal (redacted)."""
    commit = _git(project_dir, "rev-parse", "HEAD")
    status = _git(project_dir, "status", "--porcelain", "--untracked-files=no")
    diff = _git(project_dir, "diff", "HEAD") or ""
    dirty = bool(status and status.strip())
    diff_sha = None
    if dirty:
        diff = redact(diff)
        write_text_atomic(journal_dir / "git.diff", diff)
        diff_sha = sha256_bytes(diff.encode("utf-8"))
    return GitInfo(commit=commit.strip() if commit else None, dirty=dirty, diff_sha256=diff_sha)


def environment_info(*, world_size: int, num_threads: int) -> dict[str, str]:
    """Versions, hardware and the numerics-relevant environment (never secrets)."""
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "world_size": str(world_size),
        "num_threads": str(num_threads),
    }
    for dist in ("torch", "transformers", "tokenizers", "numpy", "mlflow", "dvc", "openrelease"):
        try:
            env[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[dist] = "absent"
    if "torch" in sys.modules:
        import torch

        env["cuda"] = str(torch.version.cuda)
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_count"] = str(torch.cuda.device_count())
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))  # type: ignore[no-untyped-call]
    env.update({k: os.environ[k] for k in _ENV_KEPT if k in os.environ})
    return env


def pip_freeze() -> str:
    """``name==version`` of every installed distribution, sorted."""
    lines = {f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()}
    return "\n".join(sorted(lines)) + "\n"


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested params into MLflow ``a.b.c`` keys with string values (redacted)."""
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): redact(str(obj))[:6000]}


def pipeline_key(project_dir: Path, params: PipelineParams) -> str:
    """Groups the stage runs of one pipeline run under one parent.

    ``OPENRELEASE_PIPELINE_RUN`` names it explicitly; otherwise it is the (git commit, params)
    pair, so every stage that `dvc repro` runs for the same code and params shares a parent.
    """
    explicit = os.environ.get("OPENRELEASE_PIPELINE_RUN")
    if explicit:
        return "pipeline-" + hashlib.sha256(explicit.encode()).hexdigest()[:16]
    commit = (_git(project_dir, "rev-parse", "HEAD") or "no-git").strip()
    body = sha256_json({"commit": commit, "params": params.model_dump(mode="json")})
    return "pipeline-" + body.removeprefix("sha256:")[:16]


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


class StageTracker:
    """Records one stage run. Construct on every rank; only ``enabled`` (rank 0) writes."""

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
        self._offline_until = 0.0
        self._retry_s = OFFLINE_RETRY_S
        self._started_ms = now_ms()
        self._world_size, self._num_threads = world_size, num_threads
        self._inputs: tuple[InputRecord, ...] = ()
        self._checkpoints: list[CheckpointMeta] = []
        self._final: dict[str, float] = {}
        self._logged: set[tuple[str | None, str, int, float]] | None = None
        self._sender: threading.Thread | None = None
        self._git: GitInfo | None = None
        self._env: dict[str, str] = {}

    def _stage_params(self) -> dict[str, Any]:
        dumped = self.params.model_dump(mode="json")
        sections = {"data": ["seed", "data"], "eval": ["seed", "eval"]}.get(
            self.stage, ["seed", "compute", "model", self.stage]
        )
        return {k: dumped[k] for k in sections if k in dumped}

    def start(self, inputs: list[InputRecord]) -> None:
        """Open the parent and child runs and record params, code, environment and inputs."""
        if not self.enabled:
            return
        self._inputs = tuple(inputs)
        self._git = git_info(self.project_dir, self.journal.journal_dir)
        self._env = environment_info(world_size=self._world_size, num_threads=self._num_threads)
        freeze_path = self.journal.journal_dir / "pip-freeze.txt"
        write_text_atomic(freeze_path, pip_freeze())
        params_path = self.journal.journal_dir / "params.resolved.json"
        write_text_atomic(params_path, redact(dump_json(self.params.model_dump(mode="json"))))
        stage_params = self._stage_params()
        tags = {
            "openrelease.stage": self.stage,
            "dvc.stage": self.stage,
            "openrelease.pipeline_key": self.pipeline_key,
            "openrelease.params_digest": sha256_json(stage_params),
            "openrelease.git_commit": self._git.commit or "none",
            "openrelease.git_dirty": str(self._git.dirty).lower(),
            **{f"env.{k}": redact(v) for k, v in self._env.items()},
        }
        ops: list[dict[str, Any]] = [
            {
                "op": "run",
                "key": self.pipeline_key,
                "name": f"pipeline {self.pipeline_key[9:17]}",
                "time": self._started_ms,
                "tags": {"openrelease.kind": "pipeline"},
            },
            {
                "op": "run",
                "key": self.run_key,
                "parent": self.pipeline_key,
                "name": self.stage,
                "time": self._started_ms,
                "tags": {"openrelease.kind": "stage"},
            },
            {"op": "params", "run": self.run_key, "params": flatten(stage_params)},
            {"op": "tags", "run": self.run_key, "tags": tags},
            {"op": "artifact", "run": self.run_key, "path": str(params_path), "dir": "params"},
            {"op": "artifact", "run": self.run_key, "path": str(freeze_path), "dir": "environment"},
        ]
        lock = self.project_dir / "dvc.lock"
        if lock.is_file():  # the lock as this stage starts: the hashes of every stage upstream
            tags["dvc.lock_sha256"] = sha256_file(lock)
            ops.append({"op": "artifact", "run": self.run_key, "path": str(lock), "dir": "dvc"})
        if self._git.dirty:
            ops.append(
                {
                    "op": "artifact",
                    "run": self.run_key,
                    "path": str(self.journal.journal_dir / "git.diff"),
                    "dir": "code",
                }
            )
        ops += [
            {
                "op": "input",
                "run": self.run_key,
                "name": i.name,
                "digest": i.digest,
                "source": f"file://{i.path}",
                "context": i.kind,
                "tags": {"sha256": i.digest, "path": i.path},
            }
            for i in inputs
        ]
        self._pending += ops
        self.flush(force=True)

    def _new_metrics(
        self, metrics: dict[str, float], *, step: int, model: str | None
    ) -> list[list[Any]]:
        """``[key, value, ts, step]`` rows not journaled before for this run.

        A resumed stage re-runs the steps after its last state and, being deterministic, gets
        the values already logged before the kill; they are not sent twice.
        """
        if self._logged is None:
            self._logged = {
                (op.get("model"), k, int(st), float(v))
                for op in self.journal.read_ops()
                if op.get("op") == "metrics" and op.get("run") == self.run_key
                for k, v, _, st in op["metrics"]
            }
        ts, rows = now_ms(), []
        for k, v in metrics.items():
            seen = (model, k, step, float(v))
            if seen not in self._logged:
                self._logged.add(seen)
                rows.append([k, float(v), ts, step])
        return rows

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        """Buffer per-step metrics; they reach MLflow in batches."""
        if not self.enabled:
            return
        self._final.update({k: float(v) for k, v in metrics.items()})
        if rows := self._new_metrics(metrics, step=step, model=None):
            self._pending.append({"op": "metrics", "run": self.run_key, "metrics": rows})
        if time.monotonic() - self._last_flush >= FLUSH_EVERY_S:
            self.flush()

    def log_model_metrics(self, model_key: str, metrics: dict[str, float], *, step: int) -> None:
        """Log ``metrics`` on this run, linked to the LoggedModel ``model_key`` (any stage's)."""
        if not self.enabled:
            return
        if rows := self._new_metrics(metrics, step=step, model=model_key):
            op = {"op": "metrics", "run": self.run_key, "model": model_key, "metrics": rows}
            self._pending.append(op)

    def log_checkpoint(self, meta: CheckpointMeta, *, path: Path) -> None:
        """Record a release checkpoint as an MLflow LoggedModel (no bytes uploaded)."""
        if not self.enabled:
            return
        self._checkpoints = [c for c in self._checkpoints if c.step != meta.step] + [meta]
        model_key = f"{self.run_key}:step-{meta.step}"
        tags = {
            "uri": path.resolve().as_uri(),
            "stage": meta.stage,
            "step": str(meta.step),
            "tokens_seen": str(meta.tokens_seen),
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
                "key": model_key,
                "name": f"{meta.stage}-step{meta.step}",
                "tags": tags,
                "params": {"step": str(meta.step), "stage": meta.stage},
            }
        )
        if meta.loss is not None:
            self.log_model_metrics(model_key, {"checkpoint_loss": meta.loss}, step=meta.step)
        # Durable now; MLflow gets it with the next timed flush, off the checkpoint's critical path.
        self.flush(reach_mlflow=False)

    def flush(self, *, force: bool = False, reach_mlflow: bool = True) -> None:
        """Journal pending operations, write record.json, and send the journal to MLflow.

        Timed sends run on a background thread, so training steps never wait on MLflow;
        ``force`` (the start and the end of the run) waits for it and sends in the foreground,
        even during a back-off. After
        a failed attempt MLflow is only tried again once the back-off has passed.
        ``reach_mlflow=False`` makes the record durable (journal, record.json) and leaves MLflow
        to the next timed flush.
        """
        if not self.enabled:
            return
        self.journal.append(self._pending)
        self._pending = []
        self.write_record(status="RUNNING")
        if not reach_mlflow:
            return
        self._last_flush = time.monotonic()
        if force:
            self._wait_for_sender()
            self._send()
        elif time.monotonic() >= self._offline_until and not self._sending():
            self._sender = threading.Thread(target=self._send, name="openrelease-mlflow")
            self._sender.daemon = True  # the journal keeps whatever a killed process did not send
            self._sender.start()

    def _sending(self) -> bool:
        return self._sender is not None and self._sender.is_alive()

    def _wait_for_sender(self) -> None:
        if self._sender is not None:
            self._sender.join()
            self._sender = None

    def _send(self) -> None:
        """Apply the journal's pending operations to MLflow; on failure, back off."""
        try:
            drain(self.journal, self.uri)
        except Exception as exc:  # any tracking failure: training must go on, the journal keeps it
            self._offline_until = time.monotonic() + self._retry_s
            self._retry_s = min(2 * self._retry_s, OFFLINE_RETRY_MAX_S)
            logger.warning(
                "MLflow unreachable (%s: %s); recording to the journal, run "
                "`openrelease tracking sync` later",
                type(exc).__name__,
                redact(str(exc))[:200],
            )
        else:
            self._offline_until, self._retry_s = 0.0, OFFLINE_RETRY_S

    def finish(self, *, status: str = "FINISHED") -> StageRecord | None:
        """Close the run, flush everything and write the final record.json."""
        if not self.enabled:
            return None
        self._pending.append({"op": "end", "run": self.run_key, "status": status, "time": now_ms()})
        self.flush(force=True)
        return self.write_record(status=status, finished=True)

    def write_record(self, *, status: str, finished: bool = False) -> StageRecord:
        """Write ``record.json`` beside the stage outputs from what was recorded so far."""
        ids = self.journal.ids()
        record = StageRecord(
            stage=self.stage,
            pipeline_key=self.pipeline_key,
            run_key=self.run_key,
            run_id=ids.get(self.run_key),
            parent_run_id=ids.get(self.pipeline_key),
            tracking_uri=redact(self.uri),
            params=self._stage_params(),
            params_digest=sha256_json(self._stage_params()),
            seed=self.params.seed,
            git=self._git or GitInfo(commit=None, dirty=False, diff_sha256=None),
            environment=self._env,
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


def sync_journals(project_dir: Path) -> SyncReport:
    """Replay every journal under ``.openrelease/journal`` into MLflow (idempotent)."""
    uri = tracking_uri(project_dir)
    applied: dict[str, int] = {}
    failed: dict[str, str] = {}
    root = project_dir / JOURNALS
    for folder in sorted(p for p in root.glob("*") if p.is_dir()):
        try:
            applied[folder.name] = drain(Journal(folder), uri)
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
