"""Provenance record: real MLflow (SQLite per test, and a real `mlflow server` on 127.0.0.1)."""

import hashlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from openrelease.digest import sha256_file, sha256_json
from openrelease.layout import Workspace
from openrelease.manifest import CheckpointMeta, FileEntry, InputRecord, write_json
from openrelease.params import PipelineParams
from openrelease.record.runinfo import dataset_source, registered_name
from openrelease.record.tracking import StageTracker, input_for_file, sync_journals
from openrelease.secrets import redact

SECRET = "hf_" + "Zq8" * 12
ServerFixture = tuple[str, Callable[[], None], Callable[[], None]]


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
    project: Path,
    params: PipelineParams,
    data_dir: Path,
    on_step: object = None,
    *,
    send: bool = True,
) -> StageTracker:
    """A pretrain-like run recorded to the journal; ``send`` sends it at its start and end
    (as the recorder's first and last drains do)."""
    tracker = StageTracker(
        "pretrain", params=params, project_dir=project, out_dir=project / "artifacts/pretrain"
    )
    tracker.start(
        [input_for_file("data-manifest", "data", project / "artifacts/data/manifest.json", project)]
    )
    if send:
        tracker.send()
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
    if send:
        tracker.send()
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
    second.send()

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    (pretrain,) = [
        r
        for r in client.search_runs([client.get_experiment_by_name("openrelease").experiment_id])
        if r.data.tags.get("openrelease.stage") == "pretrain"
    ]
    history = client.get_metric_history(pretrain.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert pretrain.info.status == "FINISHED"  # the killed run was reopened, then finished


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[ServerFixture]:
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

        deadline = time.monotonic() + 90
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
    mlflow_server: ServerFixture,
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


# --------------------------------------------------------------------------- a pipeline's record


def _write_checkpoint(project: Path, stage: str, step: int, parent: str | None) -> CheckpointMeta:
    """A checkpoint folder with real files and its meta.json (as the trainer writes them)."""
    folder = Workspace(project).checkpoint(stage, step)
    folder.mkdir(parents=True)
    seed = hashlib.sha256(f"{stage}-{step}".encode()).digest()
    (folder / "model.safetensors").write_bytes(seed * 512)
    (folder / "config.json").write_text(json.dumps({"stage": stage, "step": step}))
    files = tuple(
        FileEntry(path=p.name, size=p.stat().st_size, sha256=sha256_file(p))
        for p in sorted(folder.iterdir())
    )
    meta = CheckpointMeta(
        stage=stage,
        step=step,
        tokens_seen=step * 512,
        samples_seen=step * 8,
        sample_range=((step - 2) * 8, step * 8),
        data_digest="sha256:" + "d" * 64,
        loss=2.0 / step,
        params_digest="sha256:" + "p" * 64,
        parent_digest=parent,
        files=files,
        checkpoint_digest=sha256_json([f.model_dump() for f in files]),
    )
    write_json(folder / "meta.json", meta)
    return meta


def _record_stage(
    project: Path,
    params: PipelineParams,
    stage: str,
    inputs: list[InputRecord],
    *,
    parent: str | None,
    status: str = "FINISHED",
) -> CheckpointMeta:
    """One training stage's record (4 steps, checkpoints at 2 and 4), sent as the recorder
    does; returns its final checkpoint."""
    tracker = StageTracker(
        stage, params=params, project_dir=project, out_dir=Workspace(project).stage_dir(stage)
    )
    tracker.start(inputs)
    meta = None
    for step in range(1, 5):
        tracker.log_metrics({"loss": 3.0 / step}, step=step)
        if step % 2 == 0:
            meta = _write_checkpoint(project, stage, step, parent)
            tracker.log_checkpoint(meta, path=Workspace(project).checkpoint(stage, step))
            parent = meta.checkpoint_digest
    tracker.finish(status=status)
    tracker.send()
    assert meta is not None
    return meta


def _record_pipeline(project: Path, params: PipelineParams) -> dict[str, CheckpointMeta]:
    """pretrain, then sft from pretrain's final checkpoint, then an eval of both."""
    data = input_for_file(
        "data-manifest", "data", project / "artifacts/data/manifest.json", project
    )
    pretrain = _record_stage(project, params, "pretrain", [data], parent=None)
    init = InputRecord(
        name="pretrain-final",
        kind="checkpoint",
        path=Workspace(project).checkpoint("pretrain", 4).relative_to(project).as_posix(),
        digest=pretrain.checkpoint_digest,
    )
    sft = _record_stage(project, params, "sft", [data, init], parent=pretrain.checkpoint_digest)
    return {"pretrain": pretrain, "sft": sft}


@pytest.fixture(params=["embedded", "server"])
def mlflow_store(
    request: pytest.FixtureRequest,
    project: Path,
    template_db: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[str]:
    """The embedded default (``mlflow.db`` in the project) or a real `mlflow server`."""
    if request.param == "embedded":
        shutil.copy(template_db, project / "mlflow.db")
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield f"sqlite:///{project / 'mlflow.db'}"
        return
    server: ServerFixture = request.getfixturevalue("mlflow_server")
    uri, start, _ = server
    start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri


def _sha256_tree(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in folder.iterdir() if p.name != "meta.json"}


def test_pipeline_record_is_what_mlflow_users_expect(
    project: Path, tiny_params: PipelineParams, mlflow_store: str, tmp_path: Path
) -> None:
    import mlflow
    from mlflow import MlflowClient

    finals = _record_pipeline(project, tiny_params)
    client = MlflowClient(tracking_uri=mlflow_store, registry_uri=mlflow_store)
    exp = client.get_experiment_by_name("openrelease")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent = next(r for r in runs.values() if r.data.tags["openrelease.kind"] == "pipeline")
    assert parent.info.status == "FINISHED" and parent.info.end_time is not None
    assert parent.data.params["pretrain.lr"] == str(tiny_params.pretrain.lr)  # compare by params
    user = parent.data.tags["mlflow.user"]
    assert user
    for stage in ("pretrain", "sft"):
        run = runs[stage]
        assert run.info.status == "FINISHED" and run.info.end_time is not None
        tags = run.data.tags
        assert tags["mlflow.runName"] == stage
        assert tags["mlflow.source.name"] == f"openrelease launch {stage}"
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.user"] == user
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        # one name and one digest per input, from a local file source
        (data_input,) = run.inputs.dataset_inputs
        assert data_input.dataset.name == "data-manifest"
        assert data_input.dataset.source_type == "local"
        assert json.loads(data_input.dataset.source) == {"uri": "artifacts/data/manifest.json"}
        # the checkpoints are the run's LoggedModel outputs
        outputs = {o.model_id: o.step for o in run.outputs.model_outputs}
        models = {
            client.get_logged_model(m).tags["step"]: client.get_logged_model(m) for m in outputs
        }
        assert sorted(outputs.values()) == [2, 4] and sorted(models) == ["2", "4"]
        final = models["4"]
        assert final.tags["checkpoint_digest"] == finals[stage].checkpoint_digest
        # models:/<id> gives the checkpoint files, byte for byte
        got = Path(
            mlflow.artifacts.download_artifacts(
                f"models:/{final.model_id}",
                dst_path=str(tmp_path / f"dl-{stage}"),
                tracking_uri=mlflow_store,
            )
        )
        assert {f.path: f.sha256 for f in finals[stage].files} == _sha256_tree(got)
        # the final checkpoint is registered, with its identity in the version's tags
        (version,) = client.search_model_versions(f"name = '{registered_name(tiny_params, stage)}'")
        assert version.source == f"models:/{final.model_id}"
        assert version.tags["sha256"] == finals[stage].checkpoint_digest
        assert (version.tags["step"], version.tags["tokens"]) == ("4", "2048")
    # sft starts from pretrain's final checkpoint: a model input, not a dataset
    (model_input,) = client.get_run(runs["sft"].info.run_id).inputs.model_inputs
    pretrain_final = next(m for m in runs["pretrain"].outputs.model_outputs if m.step == 4).model_id
    assert model_input.model_id == pretrain_final
    assert registered_name(tiny_params, "sft") == f"openrelease.{tiny_params.release.name}-sft"


def test_embedded_store_links_checkpoints_and_moves_with_the_project(
    project: Path, tiny_params: PipelineParams, template_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow import MlflowClient

    shutil.copy(template_db, project / "mlflow.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    finals = _record_pipeline(project, tiny_params)
    # No checkpoint byte is stored twice: the artifact store holds hard links.
    weights = Workspace(project).checkpoint("sft", 4) / "model.safetensors"
    linked = [p for p in (project / "mlruns").rglob("model.safetensors") if p.samefile(weights)]
    assert len(linked) == 1 and weights.stat().st_nlink == 2
    # No absolute workspace path anywhere in the store.
    con = sqlite3.connect(project / "mlflow.db")
    dump = "\n".join(con.iterdump())
    con.close()
    assert str(project) not in dump and project.as_uri() not in dump

    moved = project.parent / "moved"
    shutil.move(project, moved)
    monkeypatch.chdir(moved)
    uri = "sqlite:///mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("openrelease")
    (final,) = [
        m
        for m in client.search_logged_models([exp.experiment_id])
        if m.tags["checkpoint_digest"] == finals["sft"].checkpoint_digest
    ]
    got = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{final.model_id}", dst_path=str(moved.parent / "dl"), tracking_uri=uri
        )
    )
    assert {f.path: f.sha256 for f in finals["sft"].files} == _sha256_tree(got)
    (sft,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'sft'")
    assert [a.path for a in client.list_artifacts(sft.info.run_id, "params")] == [
        "params/params.resolved.json"
    ]


def test_failed_and_killed_stages_end_their_runs_and_the_pipeline_run(
    project: Path, tiny_params: PipelineParams, store: str
) -> None:
    from mlflow import MlflowClient

    data = input_for_file(
        "data-manifest", "data", project / "artifacts/data/manifest.json", project
    )
    client = MlflowClient(tracking_uri=store)
    for stage, status in (("pretrain", "KILLED"), ("sft", "FAILED")):
        _record_stage(project, tiny_params, stage, [data], parent=None, status=status)
        exp = client.get_experiment_by_name("openrelease")
        runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
        parent = next(r for r in runs.values() if r.data.tags["openrelease.kind"] == "pipeline")
        assert (runs[stage].info.status, parent.info.status) == (status, status)
        assert runs[stage].info.end_time is not None and parent.info.end_time is not None
    # Only finished stages register their final checkpoint.
    assert client.search_registered_models() == []


def test_parent_run_names_the_dvc_experiment_and_its_overrides(
    project: Path, tiny_params: PipelineParams, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=project, check=True, capture_output=True)

    git("init", "-q")
    git("add", "params.yaml")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "params")
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["pretrain"]["lr"] = 0.0123  # what `dvc exp run -S pretrain.lr=0.0123` writes
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv("DVC_EXP_NAME", "lr-sweep-1")
    tracker = StageTracker(
        "data", params=tiny_params, project_dir=project, out_dir=project / "artifacts/x"
    )
    tracker.start([])
    tracker.finish()
    tracker.send()
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("openrelease")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`openrelease.kind` = 'pipeline'")
    assert parent.info.run_name == "lr-sweep-1 (pretrain.lr=0.0123)"
    assert parent.data.tags["dvc.exp_name"] == "lr-sweep-1"
    assert parent.data.tags["dvc.exp_overrides"] == "pretrain.lr=0.0123"
    assert parent.data.tags["mlflow.source.git.commit"]


def test_dataset_sources_local_hub_and_generated() -> None:
    from openrelease.record.applier import _dataset_source

    hub = _dataset_source(dataset_source("hf://datasets/org/corpus@v1"))
    assert (hub._get_source_type(), hub.path, hub.revision) == ("hugging_face", "org/corpus", "v1")
    local = _dataset_source(dataset_source("corpus/chat.jsonl"))
    assert (local._get_source_type(), local.uri) == ("local", "corpus/chat.jsonl")
    assert _dataset_source(dataset_source("synthetic"))._get_source_type() == "code"


def test_journal_survives_a_torn_line_and_ignores_a_write_in_progress(tmp_path: Path) -> None:
    from openrelease.record.journal import Journal

    journal = Journal(tmp_path / "j")
    journal.append([{"op": "a"}])
    with journal.path.open("a") as f:
        f.write('{"op": "tor')  # a writer killed mid-line (or still writing)
    assert journal.read_ops() == [{"op": "a"}]
    Journal(tmp_path / "j").append([{"op": "b"}])  # the next writer closes the torn line
    assert journal.read_ops() == [{"op": "a"}, {"op": "b"}]


# --------------------------------------------------------------------------- the training process

CHILD = """
import json, sys, time
from pathlib import Path
from openrelease.params import load_params
from openrelease.train import run_stage
project = Path.cwd()
report = run_stage("pretrain", load_params(project / "params.yaml"), project_dir=project)
print(json.dumps({"final_step": report.final_step,
                  "mlflow": sorted(m for m in sys.modules if m.split(".")[0] == "mlflow")}))
"""


@pytest.mark.slow
def test_training_process_never_imports_mlflow_and_the_launcher_records_it(
    project: Path, template_db: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["compute"].update(launcher="python", nproc_per_node=1)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copy(template_db, project / "mlflow.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A training process (what `openrelease train` runs on each rank) ends with no mlflow module.
    alone = tmp_path / "alone"
    shutil.copytree(project, alone)
    child = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=alone, env=env, capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report == {"final_step": raw["pretrain"]["num_steps"], "mlflow": []}
    record = json.loads((alone / "artifacts/pretrain/record.json").read_text())
    assert record["status"] == "FINISHED" and record["run_id"] is None  # journaled, not sent

    # `openrelease launch` (what dvc.yaml runs) adds the recorder process: sent, ids recorded.
    launch = subprocess.run(
        [sys.executable, "-m", "openrelease", "launch", "pretrain"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert launch.returncode == 0, launch.stderr
    record = json.loads((project / "artifacts/pretrain/record.json").read_text())
    assert record["run_id"] is not None and record["parent_run_id"] is not None
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert len(run.outputs.model_outputs) == len(record["checkpoints"])
    assert client.get_run(record["parent_run_id"]).info.status == "FINISHED"
