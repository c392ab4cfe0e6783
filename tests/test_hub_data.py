"""The data stage with a Hub tokenizer and Hub datasets (loopback Hub, real huggingface_hub)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hubserver import TOKEN, USER, HubServer
from huggingface_hub import CommitOperationAdd, HfApi
from project_paths import TEST_PARAMS
from typer.testing import CliRunner

from openrelease.cli import app
from openrelease.data.stage import build_data
from openrelease.data.store import DataStore
from openrelease.digest import sha256_file
from openrelease.errors import ArtifactError, DataError, ParamsError
from openrelease.params import load_params
from openrelease.release.datacard import data_description


@pytest.fixture
def endpoint(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    return hub


def _api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


def _project(tmp_path: Path, **data: object) -> Path:
    project = tmp_path / "proj"
    project.mkdir(parents=True)
    raw = yaml.safe_load(TEST_PARAMS.read_text())
    raw["data"].update(data)
    raw["pretrain"]["num_steps"] = 100  # data batch may look at any step of a longer run
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return project


def _build(project: Path) -> DataStore:
    params = load_params(project / "params.yaml")
    build_data(params.data, seed=params.seed, project_dir=project)
    return DataStore(project / params.data.out_dir)


def test_tokenizer_from_the_hub_is_pinned_and_used(
    endpoint: HubServer, data_dir: Path, tmp_path: Path
) -> None:
    api = _api(endpoint)
    api.create_repo(f"{USER}/tok")
    api.upload_folder(repo_id=f"{USER}/tok", folder_path=str(data_dir / "tokenizer"))
    sha = str(api.model_info(f"{USER}/tok").sha)

    project = _project(tmp_path, tokenizer={"from": f"hf:{USER}/tok@{sha}"})
    store = _build(project)
    m, trained = store.manifest, DataStore(data_dir).manifest
    source = m.tokenizer_source
    assert source is not None
    assert (source.kind, source.repo, source.commit) == ("hf", f"{USER}/tok", sha)
    for entry in source.files:  # every file used, with the digest of the Hub's copy
        assert entry.sha256 == sha256_file(data_dir / "tokenizer" / entry.path)
    assert "tokenizer.json" in {f.path for f in source.files}
    # The same tokenizer as the trained one: identical ids, shards and probe.
    assert [s.sha256 for s in m.shards] == [s.sha256 for s in trained.shards]
    probe = json.loads((store.data_dir / "tokenizer_probe.json").read_text())
    assert probe == json.loads((data_dir / "tokenizer_probe.json").read_text())
    assert m.data_digest != trained.data_digest  # the source is part of the data's identity
    assert f"tokenizer of hf:{USER}/tok@{sha}" in data_description(m)

    # A local folder works too; a floating revision is refused at params load.
    local = _project(tmp_path / "l", tokenizer={"from": "mytok"})
    shutil.copytree(data_dir / "tokenizer", local / "mytok")
    assert _build(local).manifest.tokenizer_source.kind == "local"  # type: ignore[union-attr]
    floating = _project(tmp_path / "f", tokenizer={"from": f"hf:{USER}/tok@main"})
    with pytest.raises(ParamsError, match=r"data\.tokenizer: from revision 'main' is a branch"):
        load_params(floating / "params.yaml")


def test_tokenizer_without_tokenizer_json_is_refused(endpoint: HubServer, tmp_path: Path) -> None:
    api = _api(endpoint)
    api.create_repo(f"{USER}/slow")
    api.create_commit(
        f"{USER}/slow",
        operations=[CommitOperationAdd("tokenizer.model", b"\x00sentencepiece")],
        commit_message="slow tokenizer only",
    )
    sha = str(api.model_info(f"{USER}/slow").sha)
    project = _project(tmp_path, tokenizer={"from": f"hf:{USER}/slow@{sha}"})
    with pytest.raises(DataError, match=r"has no tokenizer\.json"):
        _build(project)


def _parquet(rows: dict[str, list[str]]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(rows), sink)
    return bytes(sink.getvalue().to_pybytes())


def _upload_dataset(hub: HubServer) -> str:
    api = _api(hub)
    api.create_repo(f"{USER}/corpus", repo_type="dataset")
    texts = [f"Hub story {i}: the silver key opened door number {i}." for i in range(40)]
    ops = [
        CommitOperationAdd("README.md", b"---\nlicense: cc-by-4.0\n---\n# corpus\n"),
        CommitOperationAdd(
            "web/train-00000-of-00001.parquet", _parquet({"body": texts, "lang": ["en"] * 40})
        ),
        CommitOperationAdd("web/test-00000-of-00001.parquet", _parquet({"body": ["held out"]})),
        CommitOperationAdd(
            "math/train-00000-of-00001.parquet",
            _parquet({"question": ["What is 1 + 1?", "What is 2 + 5?"], "final": ["2", "7"]}),
        ),
    ]
    api.create_commit(f"{USER}/corpus", operations=ops, commit_message="data", repo_type="dataset")
    return str(api.dataset_info(f"{USER}/corpus").sha)


def test_hub_dataset_imports_are_pinned_licensed_and_traced(
    endpoint: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = _upload_dataset(endpoint)
    imports = [
        {
            "format": "hub",
            "repo": f"{USER}/corpus",
            "revision": sha,
            "config": "web",
            "split": "train",
            "role": "pretrain",
            "fields": {"text": "body"},
        },
        {
            "format": "hub",
            "repo": f"{USER}/corpus",
            "revision": sha,
            "data_files": ["math/*.parquet"],
            "role": "grpo",
            "fields": {"prompt": "question", "answer": "final"},
            "license": "MIT",
        },
    ]
    project = _project(tmp_path, imports=imports)
    store = _build(project)
    hub_sources = [s for s in store.manifest.sources if s.kind == "hub"]
    assert [(s.name, s.num_records, s.license) for s in hub_sources] == [
        (f"hf:{USER}/corpus/web:train", 40, "cc-by-4.0"),
        (f"hf:{USER}/corpus", 2, "MIT"),
    ]
    web = hub_sources[0].pinned
    assert web is not None and web.commit == sha and web.repo_type == "dataset"
    assert [f.path for f in web.files] == ["web/train-00000-of-00001.parquet"]
    assert hub_sources[0].path == f"hf:{USER}/corpus@{sha}"
    web_name = f"hf:{USER}/corpus/web:train"
    docs = [d for d in store.records("pretrain_docs") if d["source"] == web_name]
    assert len(docs) == 40 and all(d["text"].startswith("Hub story") for d in docs)
    assert not any("held out" in d["text"] for d in store.records("pretrain_docs"))
    grpo = [r for r in store.records("grpo") if r["source"] == f"hf:{USER}/corpus"]
    assert {(r["prompt"], r["answer"]) for r in grpo} <= {
        ("What is 1 + 1?", "2"),
        ("What is 2 + 5?", "7"),
    }
    assert f"license cc-by-4.0, commit {sha}" in data_description(store.manifest)

    # `data batch` names each sample's source and its license.
    monkeypatch.chdir(project)
    step = _step_with_hub_doc(project, web_name)
    result = CliRunner().invoke(
        app, ["data", "batch", "--stage", "pretrain", "--step", str(step), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert any(web_name in s["sources"] for s in report["samples"])
    assert report["licenses"][web_name] == "cc-by-4.0"


def _step_with_hub_doc(project: Path, source: str) -> int:
    from openrelease.data.query import batch_at

    params = load_params(project / "params.yaml")
    store = DataStore(project / params.data.out_dir)
    for step in range(1, params.pretrain.num_steps + 1):
        report = batch_at(store, params, stage="pretrain", step=step)
        if any(source in s.sources for s in report.samples):
            return step
    raise AssertionError("no step trains on a Hub document")


def test_hub_dataset_errors_are_one_line(endpoint: HubServer, tmp_path: Path) -> None:
    sha = _upload_dataset(endpoint)
    base = {"format": "hub", "repo": f"{USER}/corpus", "role": "pretrain"}
    floating = _project(tmp_path / "a", imports=[{**base, "revision": "main"}])
    with pytest.raises(ParamsError, match="is a branch or tag"):
        load_params(floating / "params.yaml")
    nothing = _project(tmp_path / "b", imports=[{**base, "revision": sha, "split": "dev"}])
    with pytest.raises(DataError, match="no Parquet file matches config None, split 'dev'"):
        _build(nothing)
    missing = _project(tmp_path / "c", imports=[{**base, "revision": sha, "config": "web"}])
    with pytest.raises(DataError, match=r"corpus/web/test-00000-of-00001\.parquet:row 1: "):
        _build(missing)  # the default text field is "text"; the column here is "body"
    gone = _project(tmp_path / "d", imports=[{**base, "repo": f"{USER}/nope", "revision": sha}])
    with pytest.raises(ArtifactError, match="not found on"):
        _build(gone)
    with pytest.raises(ParamsError, match="format hub needs repo"):
        load_params(
            _project(tmp_path / "e", imports=[{"format": "hub", "role": "sft"}]) / "params.yaml"
        )
