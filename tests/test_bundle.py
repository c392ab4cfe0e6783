"""`openrelease bundle` on a real tiny workspace: data, pretrain, sft and eval, run once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from project_paths import TEST_PARAMS
from recording import send_stage

from openrelease.audit.mof import load_mot_yaml, score_release
from openrelease.audit.report import audit
from openrelease.errors import ArtifactError, ParamsError, ProvenanceError
from openrelease.manifest import BundleManifest, read_model
from openrelease.params import PipelineParams, load_params
from openrelease.release import files as bundle_mod
from openrelease.release.bundle import BundleReport, build_bundle
from openrelease.verify.bundle import verify_bundle

SECRET = "hf_" + "Xy7" * 12
STAGES_RUN = ("pretrain", "sft")


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project after `dvc repro data pretrain sft eval` (in-process, one rank, ~10 s)."""
    from openrelease.data.stage import run_data_stage
    from openrelease.eval.stage import run_eval_stage
    from openrelease.train import run_stage

    project = tmp_path_factory.mktemp("bundle-workspace")
    shutil.copy(TEST_PARAMS, project / "params.yaml")
    params = load_params(project / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        mp.setenv("HF_TOKEN", SECRET)
        run_data_stage(params, project_dir=project)
        for stage in STAGES_RUN:
            run_stage(stage, params, project_dir=project)
            send_stage(project, stage)  # what the launcher's recorder does
        run_eval_stage(params, project_dir=project)
    return project


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)


@pytest.fixture(scope="session")
def built(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BundleReport]:
    """The bundle of the session workspace (built with HF_TOKEN set; treat as read-only)."""
    out = tmp_path_factory.mktemp("bundle-out") / "release"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", SECRET)
        report = build_bundle(workspace, out, params=load_params(workspace / "params.yaml"))
    return out, report


@pytest.fixture
def ws(tmp_path: Path, workspace: Path) -> Path:
    """A private copy of the workspace (mtimes kept), safe to break."""
    dst = tmp_path / "ws"
    shutil.copytree(workspace, dst)
    return dst


def _params(project: Path) -> PipelineParams:
    return load_params(project / "params.yaml")


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


# --------------------------------------------------------------------------- the happy path


def test_bundle_is_mof_class_i_and_verifies(built: tuple[Path, BundleReport]) -> None:
    out, report = built
    assert report.stages == STAGES_RUN
    assert report.warnings == ("bundling pretrain -> sft; dpo, distill, grpo have not run",)
    assert len(report.components) == 17
    result = audit(str(out))
    assert result.verified is not None and result.claimed is not None
    assert (result.claimed.mof_class, result.verified.mof_class) == (1, 1), result.to_markdown()
    assert [p for p in result.problems if p.severity == "error"] == []
    assert all(r.verified for r in result.rows), result.to_markdown()
    verified = verify_bundle(out)
    assert verified.ok, verified.problems
    assert verified.num_files == report.num_files
    # Only the RNG pickles of the resumable states are warned about.
    assert {p.path.split("/")[0] for p in verified.problems if p.path} <= {"states"}


def test_bundle_layout(built: tuple[Path, BundleReport], workspace: Path) -> None:
    out, _ = built
    files = {m.path for m in read_model(out / "MANIFEST.json", BundleManifest).files}
    for rel in (
        "README.md",
        "mof.yaml",
        "model/model.safetensors",
        "model/config.json",
        "model/tokenizer.json",
        "model/tokenizer_probe.json",
        "checkpoints/pretrain/step-4/meta.json",
        "checkpoints/pretrain/step-8/model.safetensors",
        "checkpoints/sft/step-2/model.safetensors",
        "states/pretrain/step-8/state.json",
        "states/sft/step-4/state.json",
        "data/croissant.json",
        "data/manifest.json",
        "data/order.json",
        "data/eval_problems.jsonl",
        "data/pretrain/shard-00000.npy",
        "code/openrelease/train/model.py",
        "code/openrelease/train/loop.py",
        "code/requirements.txt",
        "code/SOURCE.json",
        "configs/params.yaml",
        "configs/resolved/sft.json",
        "logs/pretrain/metrics.jsonl",
        "logs/data/record.json",
        "evals/results/sft/step-4.json",
        "evals/samples/sft.jsonl",
        "docs/technical_report.md",
        "docs/research_paper.md",
        "sbom/bom.cdx.json",
        "LICENSES/Apache-2.0.txt",
        "LICENSES/CDLA-Permissive-2.0.txt",
        "LICENSES/CC-BY-4.0.txt",
    ):
        assert rel in files, rel
    assert not any(p.startswith("states/pretrain/step-4") for p in files)  # retention: last only
    assert (out / "configs/params.yaml").read_bytes() == (workspace / "params.yaml").read_bytes()
    assert "torch==" in (out / "code/requirements.txt").read_text()
    order = json.loads((out / "data/order.json").read_text())
    meta = json.loads((out / "checkpoints/sft/step-4/meta.json").read_text())
    assert order["stages"]["sft"]["checkpoints"][-1]["order_digest"] == meta["data_digest"]
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "apache-2.0"
    assert front["model-index"][0]["results"][0]["metrics"]


def test_final_model_and_checkpoints_load_with_transformers(
    built: tuple[Path, BundleReport],
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = built
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    last = AutoModelForCausalLM.from_pretrained(out / "checkpoints/sft/step-4")
    for (name, a), (_, b) in zip(
        model.state_dict().items(), last.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    ids = tokenizer("What is 2 + 2?", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def test_mof_yaml_parses_and_scores_class_i(built: tuple[Path, BundleReport]) -> None:
    out, _ = built
    doc = load_mot_yaml(out / "mof.yaml")
    assert doc.release.name == "openrelease-test"
    assert doc.release.date == _created(out)[:10]
    assert score_release(doc).mof_class == 1
    paths = {c.name: c.component_path for c in doc.release.components}
    assert paths["Model parameters (Intermediate)"] == "checkpoints"


def _created(out: Path) -> str:
    return read_model(out / "MANIFEST.json", BundleManifest).created


def test_croissant_card_validates_and_reads(built: tuple[Path, BundleReport]) -> None:
    import mlcroissant as mlc

    out, _ = built
    dataset = mlc.Dataset(jsonld=out / "data" / "croissant.json")
    issues = dataset.metadata.ctx.issues
    assert (issues.errors, issues.warnings) == (set(), set())
    first = next(iter(dataset.records("sft")))
    line = json.loads((out / "data" / "sft.jsonl").read_text().splitlines()[0])
    assert first["sft/prompt"].decode() == line["prompt"]


def test_sbom_validates_against_cyclonedx_1_6(built: tuple[Path, BundleReport]) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    out, _ = built
    text = (out / "sbom" / "bom.cdx.json").read_text()
    errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text, all_errors=True)
    assert errors is None, [str(e)[:300] for e in errors]
    bom = json.loads(text)
    model = bom["components"][0]
    weights = json.loads((out / "checkpoints/sft/step-4/meta.json").read_text())["files"]
    sha = next(f["sha256"] for f in weights if f["path"] == "model.safetensors")
    assert model["hashes"] == [{"alg": "SHA-256", "content": sha.removeprefix("sha256:")}]
    assert any(c.get("name") == "torch" for c in bom["components"])


def test_no_secret_reaches_the_bundle(built: tuple[Path, BundleReport]) -> None:
    out, _ = built
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_rebuild_gives_byte_identical_manifest(
    built: tuple[Path, BundleReport], workspace: Path, tmp_path: Path, secret_env: None
) -> None:
    out, report = built
    again = tmp_path / "release"
    second = build_bundle(workspace, again, params=_params(workspace))
    assert (again / "MANIFEST.json").read_bytes() == (out / "MANIFEST.json").read_bytes()
    assert second.bundle_digest == report.bundle_digest
    build_bundle(workspace, again, params=_params(workspace))  # over the previous bundle
    assert (again / "MANIFEST.json").read_bytes() == (out / "MANIFEST.json").read_bytes()
    assert _siblings(again) == []


def test_recorded_checkpoint_and_data_digests_are_not_recomputed(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[str] = []
    real = bundle_mod.hash_files

    def spy(root: Path, sizes: dict[str, int], **kw: Any) -> tuple[dict[str, str], dict[str, str]]:
        hashed.extend("/" + p for p in sizes)
        return real(root, sizes, **kw)

    monkeypatch.setattr(bundle_mod, "hash_files", spy)
    monkeypatch.setattr(bundle_mod, "LINK_MIN_BYTES", 1)  # every file counts as large
    report = build_bundle(workspace, tmp_path / "release", params=_params(workspace))
    data_dir = (workspace / "artifacts/data").resolve().as_posix()
    recorded = [
        p
        for p in hashed
        if ("/checkpoints/" in p and not p.endswith("meta.json"))
        or p.startswith((f"{data_dir}/pretrain/", f"{data_dir}/tokenizer/"))
        or (p.startswith(data_dir) and p.endswith(".jsonl"))
    ]
    assert any("/.openrelease/portable/" in p for p in hashed) and recorded == []  # states
    manifest = read_model(tmp_path / "release" / "MANIFEST.json", BundleManifest)
    recorded_bytes = sum(
        e.size for e in manifest.files if e.path.startswith(("checkpoints/", "data/"))
    )
    assert report.bytes_hashed <= report.num_bytes - recorded_bytes


def test_large_files_are_hard_linked_or_copied_on_request(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bundle_mod, "LINK_MIN_BYTES", 1)
    src = workspace / "artifacts/sft/checkpoints/step-4/model.safetensors"
    linked = build_bundle(workspace, tmp_path / "a", params=_params(workspace))
    assert (tmp_path / "a/model/model.safetensors").stat().st_ino == src.stat().st_ino
    assert linked.num_linked > 0
    copied = build_bundle(workspace, tmp_path / "b", params=_params(workspace), link=False)
    assert (tmp_path / "b/model/model.safetensors").stat().st_ino != src.stat().st_ino
    assert copied.num_linked == 0
    assert copied.bundle_digest == linked.bundle_digest
    # Files that stages append to in place (logs) are never linked.
    metrics = workspace / "artifacts/pretrain/metrics.jsonl"
    assert (tmp_path / "a/logs/pretrain/metrics.jsonl").stat().st_ino != metrics.stat().st_ino


# --------------------------------------------------------------------------- failures


def test_missing_eval_results_names_the_dvc_stage(ws: Path, tmp_path: Path) -> None:
    shutil.rmtree(ws / "artifacts/eval/results")
    out = tmp_path / "release"
    with pytest.raises(ArtifactError) as info:
        build_bundle(ws, out, params=_params(ws))
    assert str(info.value) == "no eval results in artifacts/eval/results; run `dvc repro eval`."
    assert not out.exists() and _siblings(out) == ["ws"]


def test_stale_eval_result_and_missing_stage_name_their_fix(ws: Path, tmp_path: Path) -> None:
    result = ws / "artifacts/eval/results/sft/step-4.json"
    body = json.loads(result.read_text())
    result.write_text(json.dumps({**body, "checkpoint_digest": "sha256:" + "0" * 64}))
    with pytest.raises(ArtifactError, match=r"sft/step-4\.json evaluates .*`dvc repro eval`"):
        build_bundle(ws, tmp_path / "r", params=_params(ws))
    (ws / "artifacts/pretrain/manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"pretrain/manifest.json is missing but later "):
        build_bundle(ws, tmp_path / "r", params=_params(ws))
    shutil.rmtree(ws / "artifacts/data")
    with pytest.raises(ArtifactError, match=r"artifacts/data/manifest.json .*`dvc repro data`"):
        build_bundle(ws, tmp_path / "r", params=_params(ws))


def test_failed_build_leaves_the_previous_bundle_untouched(ws: Path, tmp_path: Path) -> None:
    out = tmp_path / "release"
    build_bundle(ws, out, params=_params(ws))
    before = (out / "MANIFEST.json").read_bytes()
    weights = ws / "artifacts/sft/checkpoints/step-4/model.safetensors"
    with weights.open("ab") as f:
        f.write(b"\0")  # the file no longer matches its meta.json
    with pytest.raises(ArtifactError, match=r"model.safetensors is \d+ bytes but its record"):
        build_bundle(ws, out, params=_params(ws))
    assert (out / "MANIFEST.json").read_bytes() == before
    assert _siblings(out) == ["ws"]
    assert verify_bundle(out).ok


def test_edited_checkpoint_file_is_rehashed_and_refused(ws: Path, tmp_path: Path) -> None:
    config = ws / "artifacts/pretrain/checkpoints/step-4/config.json"
    text = config.read_text()
    config.write_text(text.replace('"llama"', '"LLAMA"'))  # same size, newer than meta.json
    with pytest.raises(ArtifactError, match=r"config.json has sha256:.* records sha256:"):
        build_bundle(ws, tmp_path / "release", params=_params(ws))
    assert not (tmp_path / "release").exists()


def test_a_secret_in_the_record_stops_the_build(ws: Path, tmp_path: Path, secret_env: None) -> None:
    samples = ws / "artifacts/eval/samples/sft.jsonl"
    samples.write_text(samples.read_text() + json.dumps({"output": SECRET}) + "\n")
    out = tmp_path / "release"
    with pytest.raises(ProvenanceError, match=r"evals/samples/sft.jsonl contains .*\$HF_TOKEN"):
        build_bundle(ws, out, params=_params(ws))
    assert not out.exists() and _siblings(out) == ["ws"]


def test_out_dir_that_is_not_a_bundle_is_refused(ws: Path, tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="would replace the workspace"):
        build_bundle(ws, ws, params=_params(ws))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me\n")
    with pytest.raises(ParamsError, match="is not a release bundle"):
        build_bundle(ws, other, params=_params(ws))
    assert (other / "todo.txt").read_text() == "keep me\n"


def test_non_open_license_needs_consent_and_its_text(ws: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    raw["release"]["licenses"]["weights"] = "CC-BY-NC-4.0"
    (ws / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"weights: 'CC-BY-NC-4.0' is not a license MOF"):
        build_bundle(ws, tmp_path / "r", params=_params(ws))
    raw["release"]["licenses"]["allow_nonopen"] = True
    (ws / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"LICENSES/CC-BY-NC-4.0.txt"):
        build_bundle(ws, tmp_path / "r", params=_params(ws))
    (ws / "LICENSES").mkdir()
    (ws / "LICENSES/CC-BY-NC-4.0.txt").write_text("Attribution-NonCommercial 4.0 International\n")
    build_bundle(ws, tmp_path / "r", params=_params(ws))
    result = audit(str(tmp_path / "r"))
    assert result.verified is not None and result.verified.mof_class == 0


# --------------------------------------------------------------------------- variants


def test_retention_policy_picks_the_training_states(ws: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    raw["release"]["retention"] = {"state_every_k": 1, "keep_last": False}
    (ws / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "release"
    build_bundle(ws, out, params=_params(ws))
    assert sorted(p.name for p in (out / "states/pretrain").iterdir()) == ["step-4", "step-8"]
    shutil.rmtree(ws / "artifacts/pretrain/states/step-4")  # pruned by keep_last_states
    with pytest.raises(ArtifactError, match=r"states/step-4 is missing .* pretrain.keep_last"):
        build_bundle(ws, out, params=_params(ws))


def test_workspace_without_records_still_bundles(ws: Path, tmp_path: Path) -> None:
    for record in ws.glob("artifacts/*/record.json"):
        record.unlink()
    shutil.rmtree(ws / ".openrelease")
    report = build_bundle(ws, tmp_path / "release", params=_params(ws))
    assert any("no record.json for pretrain, sft" in w for w in report.warnings), report.warnings
    assert any("no recorded pip freeze" in w for w in report.warnings)
    assert not (tmp_path / "release/logs/mlflow").exists()
    assert audit(str(tmp_path / "release")).mof_class == 1


def test_pointers_instead_of_training_data(ws: Path, tmp_path: Path) -> None:
    import mlcroissant as mlc

    raw = yaml.safe_load((ws / "params.yaml").read_text())
    raw["release"]["include_data"] = False
    (ws / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "release"
    build_bundle(ws, out, params=_params(ws))
    assert not (out / "data/pretrain").exists() and not (out / "data/sft.jsonl").exists()
    assert (out / "data/eval_problems.jsonl").is_file()
    pointers = json.loads((out / "data/pointers.json").read_text())["files"]
    assert any(p["path"] == "sft.jsonl" and p["url"].endswith("/sft.jsonl") for p in pointers)
    assert mlc.Dataset(jsonld=out / "data/croissant.json").metadata.ctx.issues.errors == set()
    assert verify_bundle(out).ok


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_workspace_ships_the_committed_source(ws: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
    }
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    (ws / ".gitignore").write_text("artifacts/\n.openrelease/\nmlflow.db\n")
    for args in (["init", "-q"], ["add", "params.yaml", ".gitignore"], ["commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=ws, check=True, env=env, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, capture_output=True, text=True)
    out = tmp_path / "release"
    build_bundle(ws, out, params=_params(ws))
    source = json.loads((out / "code/SOURCE.json").read_text())
    assert (source["kind"], source["commit"]) == ("git-archive", head.stdout.strip())
    assert (out / "code/params.yaml").read_bytes() == (ws / "params.yaml").read_bytes()
    assert (out / "code/openrelease/train/model.py").is_file()  # the package is not in this repo
    assert audit(str(out)).mof_class == 1


def test_real_bundle_publishes_verifies_and_loads_from_a_branch(
    built: tuple[Path, BundleReport], hub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trained tiny bundle end to end on the loopback Hub: publish, verify, audit, load."""
    from hubserver import TOKEN, USER
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM

    from openrelease.audit.report import audit_hub_repo
    from openrelease.release.publish import publish_bundle
    from openrelease.verify.hub import verify_hub

    out, _ = built
    repo = f"{USER}/tiny-trained"
    monkeypatch.delenv("HF_TOKEN", raising=False)  # the `built` bundle was made with it set
    report = publish_bundle(out, repo_id=repo, endpoint=hub.endpoint, token=TOKEN)
    assert report.ok, (report.missing, report.mismatched)
    assert verify_hub(repo, endpoint=hub.endpoint, token=TOKEN).ok
    audited = audit_hub_repo(repo, endpoint=hub.endpoint, token=TOKEN)
    assert audited.mof_class == 1, [(r.component, r.problem) for r in audited.rows if r.problem]
    assert hub.lfs_bytes_downloaded == 0
    first = sorted(p.name for p in (out / "checkpoints" / "pretrain").iterdir())[0]
    branch = json.loads((out / "branches.json").read_text())["branches"][
        f"checkpoints/pretrain/{first}"
    ]
    assert branch.startswith(f"pretrain-step{int(first.removeprefix('step-'))}-tokens")
    local = snapshot_download(repo, revision=branch, endpoint=hub.endpoint, token=TOKEN)
    model = AutoModelForCausalLM.from_pretrained(local)
    assert model.config.num_hidden_layers > 0


def test_eval_metrics_are_linked_to_the_checkpoint_logged_models(workspace: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    exp = client.get_experiment_by_name("openrelease")
    assert exp is not None
    models = client.search_logged_models([exp.experiment_id])
    by_name = {m.name: m for m in models}
    final = max(
        (m for m in models if m.name.startswith("sft-step")), key=lambda m: int(m.tags["step"])
    )
    linked = {m.key for m in by_name[final.name].metrics or []}
    assert {"checkpoint_loss", "sft/heldout_loss"} <= linked, linked
    runs = client.search_runs([exp.experiment_id], "tags.`openrelease.stage` = 'eval'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "sft/heldout_loss" in runs[0].data.metrics
    assert not [k for k in runs[0].data.metrics if "/" not in k]  # every metric is <stage>/...
    # One step axis for the pipeline: sft's steps come after pretrain's.
    params = load_params(workspace / "params.yaml")
    history = client.get_metric_history(runs[0].info.run_id, "sft/heldout_loss")
    sft_steps = [int(m.tags["step"]) for m in models if m.name.startswith("sft-step")]
    assert sorted(m.step for m in history) == sorted(
        params.pretrain.num_steps + s for s in sft_steps
    )
    # The pipeline run carries each stage's final eval metrics and ends finished.
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and parent.info.end_time is not None
    assert {"pretrain/heldout_loss", "sft/heldout_loss"} <= set(parent.data.metrics)
    final_sft = max(history, key=lambda m: m.step)
    assert parent.data.metrics["sft/heldout_loss"] == final_sft.value
    assert "dvc.lock_sha256" not in runs[0].data.tags  # no dvc.lock in this workspace
