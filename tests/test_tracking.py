"""Provenance record: real MLflow (SQLite per test, and a real `mlflow server` on 127.0.0.1)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from openrelease.manifest import CheckpointMeta, FileEntry
from openrelease.params import PipelineParams
from openrelease.record.tracking import StageTracker, input_for_file, redact, sync_journals

SECRET = "hf_" + "Zq8" * 12


@pytest.fixture
def store(tmp_path: Path, template_db: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return uri


def _meta(step: int, parent: str | None) -> CheckpointMeta:
    files = (FileEntry(path="model.safetensors", size=10, sha256="sha256:" + f"{step:064d}"),)
    return CheckpointMeta(
        stage="pretrain",
        step=step,
        tokens_seen=step * 512,
        samples_seen=step * 8,
        sample_range=((step - 2) * 8, step * 8),
        data_digest="sha256:" + "d" * 64,
        loss=2.0 / step,
        params_digest="sha256:" + "p" * 64,
        parent_digest=parent,
        files=files,
        checkpoint_digest="sha256:" + f"{step:064x}",
    )


def _record_run(
    project: Path, params: PipelineParams, data_dir: Path, on_step: object = None
) -> StageTracker:
    tracker = StageTracker(
        "pretrain", params=params, project_dir=project, out_dir=project / "artifacts/pretrain"
    )
    tracker.start(
        [input_for_file("data-manifest", "data", project / "artifacts/data/manifest.json", project)]
    )
    parent = None
    for step in range(1, 5):
        tracker.log_metrics({"loss": 3.0 / step, "lr": 0.001 * step}, step=step)
        if step % 2 == 0:
            meta = _meta(step, parent)
            tracker.log_checkpoint(
                meta, path=project / f"artifacts/pretrain/checkpoints/step-{step}"
            )
            parent = meta.checkpoint_digest
        if callable(on_step):
            on_step(step)
    tracker.finish()
    return tracker


def _content(uri: str) -> dict[str, object]:
    """Everything we record, without ids and wall times, to compare two stores."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("openrelease")
    runs = client.search_runs([exp.experiment_id])
    out: dict[str, object] = {}
    for run in runs:
        name = run.info.run_name
        metrics = {
            k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
            for k in run.data.metrics
        }
        tags = {
            k: v
            for k, v in run.data.tags.items()
            if not k.startswith("mlflow.") and k not in ("env.platform",)
        }
        inputs = sorted(d.dataset.name for d in run.inputs.dataset_inputs)
        out[name] = {
            "params": run.data.params,
            "metrics": metrics,
            "tags": tags,
            "inputs": inputs,
            "status": run.info.status,
            "has_parent": "mlflow.parentRunId" in run.data.tags,
        }
    models = client.search_logged_models([exp.experiment_id])
    out["models"] = sorted(
        (m.name, m.tags["checkpoint_digest"], m.tags["tokens_seen"]) for m in models
    )
    return out


def test_stage_run_is_fully_queryable(
    project: Path, tiny_params: PipelineParams, data_dir: Path, store: str
) -> None:
    from mlflow import MlflowClient

    tracker = _record_run(project, tiny_params, data_dir)
    client = MlflowClient(tracking_uri=store)
    record = json.loads((project / "artifacts/pretrain/record.json").read_text())
    child = client.get_run(record["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == record["parent_run_id"]
    assert client.get_run(record["parent_run_id"]).data.tags["openrelease.kind"] == "pipeline"
    assert child.data.params["pretrain.lr"] == str(tiny_params.pretrain.lr)
    assert child.data.params["seed"] == str(tiny_params.seed)
    assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [1, 2, 3, 4]
    assert child.info.status == "FINISHED"
    assert child.inputs.dataset_inputs[0].dataset.name == "data-manifest"
    models = client.search_logged_models([child.info.experiment_id])
    assert sorted(m.tags["step"] for m in models) == ["2", "4"]
    assert all(m.source_run_id == child.info.run_id for m in models)
    assert (
        record["checkpoints"][1]["parent_digest"] == record["checkpoints"][0]["checkpoint_digest"]
    )
    assert tracker.journal.cursor() == len(tracker.journal.read_ops())


def test_secret_in_environment_never_reaches_mlflow(
    project: Path, tiny_params: PipelineParams, data_dir: Path, store: str
) -> None:
    _record_run(project, tiny_params, data_dir)
    db_bytes = Path(store.removeprefix("sqlite:///")).read_bytes()
    assert SECRET.encode() not in db_bytes
    for path in project.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert redact(f"token={SECRET}") == "token=[REDACTED]"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_resumed_run_does_not_log_replayed_steps_twice(
    project: Path, tiny_params: PipelineParams, store: str
) -> None:
    def tracker() -> StageTracker:
        t = StageTracker(
            "pretrain", params=tiny_params, project_dir=project, out_dir=project / "artifacts/x"
        )
        t.start([])
        return t

    first = tracker()
    for step in (1, 2, 3):
        first.log_metrics({"loss": 1.0 / step}, step=step)
    first.finish(status="KILLED")
    second = tracker()  # resumed from a state at step 1: steps 2 and 3 come again, unchanged
    for step in (2, 3, 4):
        second.log_metrics({"loss": 1.0 / step}, step=step)
    second.finish()

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    (pretrain,) = [
        r
        for r in client.search_runs([client.get_experiment_by_name("openrelease").experiment_id])
        if r.data.tags.get("openrelease.stage") == "pretrain"
    ]
    history = client.get_metric_history(pretrain.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[tuple[str, callable]]:
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    db = tmp_path / "server.db"

    def start() -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            str(tmp_path / "srv-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        import urllib.request

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not start")

    def stop() -> None:
        import signal

        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)

    yield uri, start, stop
    stop()


@pytest.mark.slow
def test_outage_then_sync_matches_a_run_without_outage(
    tmp_path: Path,
    project: Path,
    tiny_params: PipelineParams,
    data_dir: Path,
    store: str,
    mlflow_server: tuple[str, callable, callable],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri, start, stop = mlflow_server
    # Reference: the same recording straight into a healthy SQLite store.
    reference_project = tmp_path / "ref"
    shutil.copytree(project, reference_project)
    _record_run(reference_project, tiny_params, data_dir)
    # The server is up at the start, dies after step 1 and stays down to the end of the run.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    start()
    tracker = _record_run(
        project, tiny_params, data_dir, on_step=lambda step: stop() if step == 1 else None
    )
    assert 0 < tracker.journal.cursor() < len(tracker.journal.read_ops())
    record = json.loads((project / "artifacts/pretrain/record.json").read_text())
    assert record["status"] == "FINISHED" and len(record["checkpoints"]) == 2
    start()
    report = sync_journals(project)
    assert not report.failed
    assert tracker.journal.cursor() == len(tracker.journal.read_ops())
    assert sync_journals(project).applied == dict.fromkeys(report.applied, 0)  # idempotent
    assert _content(uri) == _content(store)
