from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import make_bundle, write_manifest
from hubserver import TOKEN, USER, HubServer
from huggingface_hub import CommitOperationAdd, HfApi
from safetensors.numpy import save_file

from openrelease.audit.mof import mof_components, mof_release_yaml, parse_mot_yaml, score_release
from openrelease.audit.report import (
    AuditReport,
    audit,
    audit_folder,
    audit_hub_repo,
    audit_mot_yaml,
)
from openrelease.errors import ArtifactError

ASSETS = Path(__file__).parent / "assets" / "mof"
REPO = f"{USER}/tiny-open-llm"
LICENSE_TEXTS = {
    "Apache-2.0": "Apache License\nVersion 2.0, January 2004\n(abbreviated for tests)\n",
    "CDLA-Permissive-2.0": "Community Data License Agreement - Permissive - Version 2.0\n",
    "CC-BY-4.0": "Attribution 4.0 International\n(abbreviated for tests)\n",
}
# Our bundle layout (DESIGN.md): component -> (license, path)
LAYOUT = {
    "Model architecture": ("Apache-2.0", "code/openrelease/train/model.py"),
    "Data preprocessing code": ("Apache-2.0", "code/openrelease/data"),
    "Training code": ("Apache-2.0", "code/openrelease/train"),
    "Inference code": ("Apache-2.0", "code/openrelease/eval/stage.py"),
    "Evaluation code": ("Apache-2.0", "code/openrelease/eval/stage.py"),
    "Supporting libraries and tools": ("Apache-2.0", "sbom/bom.cdx.json"),
    "Model parameters (Final)": ("Apache-2.0", "model"),
    "Model parameters (Intermediate)": ("Apache-2.0", "checkpoints"),
    "Datasets": ("CDLA-Permissive-2.0", "data"),
    "Evaluation data": ("CDLA-Permissive-2.0", "data/eval_problems.jsonl"),
    "Model metadata": ("Apache-2.0", "model/config.json"),
    "Sample model outputs": ("CC-BY-4.0", "evals/samples"),
    "Model card": ("CC-BY-4.0", "README.md"),
    "Data card": ("CC-BY-4.0", "data/croissant.json"),
    "Technical report": ("CC-BY-4.0", "docs/technical_report.md"),
    "Research paper": ("CC-BY-4.0", "docs/research_paper.md"),
    "Evaluation results": ("CC-BY-4.0", "evals/results"),
}
README = """---
license: apache-2.0
datasets: [tiny-open-llm-data]
model-index:
- name: tiny-open-llm
  results: []
---
# tiny-open-llm
"""
FILES = {
    "code/openrelease/train/model.py": "class Model: ...\n",
    "code/openrelease/data/stage.py": "def prepare(): ...\n",
    "code/openrelease/train/loop.py": "def train(): ...\n",
    "code/openrelease/eval/stage.py": "def generate(): ...\n",
    "sbom/bom.cdx.json": '{"bomFormat": "CycloneDX", "specVersion": "1.6"}\n',
    "data/eval_problems.jsonl": '{"q": "1+1", "a": "2"}\n',
    "data/pretrain_docs.jsonl": '{"text": "hello"}\n',
    "evals/samples/pretrain.jsonl": '{"prompt": "1+1", "output": "2"}\n',
    "evals/results/pretrain/step-10.json": '{"loss": 4.8}\n',
    "docs/technical_report.md": "# Technical report\n",
    "docs/research_paper.md": "# Paper\n",
    "README.md": README,
}


def our_mof_yaml(layout: dict[str, tuple[str, str]]) -> str:
    return mof_release_yaml(
        name="tiny-open-llm",
        version="1M",
        producer="openrelease tests",
        components={name: lic for name, (lic, _) in layout.items()},
        paths={name: path for name, (_, path) in layout.items()},
        licenses={"distribution": "Apache-2.0", "code": "Apache-2.0"},
        license_paths={lic: f"LICENSES/{lic}.txt" for lic in LICENSE_TEXTS},
    )


def make_release(root: Path, *, layout: dict[str, tuple[str, str]] = LAYOUT) -> Path:
    """A complete Class I bundle in our layout, MANIFEST.json last."""
    bundle = make_bundle(root)
    for name in ("code/train.py", "evals/results.json", "docs/report.md", "data/shards.json"):
        (bundle / name).unlink()
    for rel, text in FILES.items():
        (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
        (bundle / rel).write_text(text)
    for lic, text in LICENSE_TEXTS.items():
        (bundle / "LICENSES" / f"{lic}.txt").write_text(text)
    croissant = {"@type": "sc:Dataset", "name": "d", "license": "CDLA-Permissive-2.0"}
    (bundle / "data" / "croissant.json").write_text(json.dumps(croissant))
    (bundle / "mof.yaml").write_text(our_mof_yaml(layout))
    write_manifest(bundle)
    return bundle


def _codes(report: AuditReport) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in report.problems:
        out.setdefault(p.code, []).append(f"{p.path}: {p.message}")
    return out


def _row(report: AuditReport, component: str) -> dict[str, object]:
    return next(r.model_dump() for r in report.rows if r.component == component)


@pytest.fixture
def release(tmp_path: Path) -> Path:
    return make_release(tmp_path)


def test_our_bundle_is_class_i_claimed_and_verified(release: Path) -> None:
    report = audit_folder(release)
    assert report.problems == []
    assert report.claimed is not None and report.verified is not None
    assert (report.claimed.mof_class, report.verified.mof_class) == (1, 1)
    assert report.mof_class == 1 and report.meets(1) and report.ok
    assert all(r.claimed and r.verified for r in report.rows)
    assert _row(report, "Model parameters (Final)")["evidence"] == ["model/model.safetensors"]
    assert _row(report, "Datasets")["license"] == "CDLA-Permissive-2.0"
    sources = {(s.source, s.license) for s in report.licenses}
    assert ("README.md", "Apache-2.0") in sources
    assert ("data/croissant.json", "CDLA-Permissive-2.0") in sources
    markdown = report.to_markdown()
    assert "| Model card | III | included | included | CC-BY-4.0 | `README.md` |" in markdown
    rewritten = parse_mot_yaml(report.to_mof_yaml(producer="x"), source="out.yml")
    assert score_release(rewritten).mof_class == 1
    json.loads(report.model_dump_json())


def test_removing_eval_results_drops_the_class_and_names_them(release: Path) -> None:
    shutil.rmtree(release / "evals" / "results")
    write_manifest(release)
    report = audit_folder(release)
    assert report.verified is not None and report.claimed is not None
    assert report.verified.mof_class == 0
    assert report.verified.missing == ["Evaluation results"]
    assert report.claimed.mof_class == 1
    assert _codes(report)["claim_without_evidence"] == [
        "mof.yaml: claims 'Evaluation results'; no evidence found."
    ]
    assert not report.meets(3)


def test_removing_eval_code_gives_class_iii(release: Path) -> None:
    (release / "code" / "openrelease" / "eval" / "stage.py").unlink()
    write_manifest(release)
    report = audit_folder(release)
    assert report.mof_class == 3
    assert report.verified is not None
    assert report.verified.missing == ["Inference code", "Evaluation code"]
    assert report.meets(3) and not report.meets(2)


def test_claim_without_evidence_is_flagged(tmp_path: Path) -> None:
    release = make_release(tmp_path)
    (release / "docs" / "research_paper.md").unlink()
    write_manifest(release)
    report = audit_folder(release)
    assert "claim_without_evidence" in _codes(report)
    row = _row(report, "Research paper")
    assert row["claimed"] and not row["verified"] and row["claimed_status"] == "included"
    assert "no evidence" in str(row["problem"])
    assert report.verified is not None
    assert report.verified.mof_class == 2  # the technical report still holds Class II
    assert round(report.verified.class_i, 2) == 92.86


def test_tampered_weights_fail_the_manifest_check(release: Path) -> None:
    weights = release / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    report = audit_folder(release)
    assert "model/model.safetensors" in str(_codes(report)["manifest_mismatch"])
    assert _row(report, "Model parameters (Final)")["verified"] is False
    assert report.mof_class == 0
    assert audit_folder(release, check_hashes=False).mof_class == 1  # same size: hashing needed


def test_insane_safetensors_header_is_refused_unread(release: Path) -> None:
    bad = release / "model" / "model.safetensors"
    bad.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    write_manifest(release)
    report = audit_folder(release)
    problem = str(_row(report, "Model parameters (Final)")["problem"])
    assert "100 MB limit" in problem
    assert report.mof_class == 0


def test_license_disagreement_and_missing_text(release: Path) -> None:
    readme = release / "README.md"
    readme.write_text(README.replace("apache-2.0", "mit"))
    (release / "LICENSES" / "CDLA-Permissive-2.0.txt").unlink()
    (release / "LICENSE").write_text("Permission is hereby granted, free of charge, to any ...")
    write_manifest(release)
    report = audit_folder(release)
    mismatches = "\n".join(_codes(report)["license_mismatch"])
    assert "README.md: states MIT but the weights' license is Apache-2.0" in mismatches
    assert "LICENSE: holds the text of MIT" in mismatches
    assert "no text of CDLA-Permissive-2.0" in str(_row(report, "Datasets")["problem"])
    assert _row(report, "Datasets")["verified_status"] == "unlicensed"
    assert report.verified is not None
    assert report.verified.missing == ["Evaluation data", "Datasets"]  # both CDLA-Permissive-2.0
    assert report.mof_class == 3


def test_path_tricks_and_broken_mof_yaml(release: Path) -> None:
    layout = dict(LAYOUT)
    layout["Training code"] = ("Apache-2.0", "../../etc/passwd")
    layout["Model card"] = ("CC-BY-4.0", "/etc/passwd")
    (release / "mof.yaml").write_text(our_mof_yaml(layout))
    report = audit_folder(release)
    problems = "\n".join(_codes(report)["evidence"])
    assert "component_path '../../etc/passwd' has an empty, '.' or '..' segment" in problems
    assert "component_path '/etc/passwd' is absolute" in problems
    assert report.mof_class == 1  # the files themselves are there, found by convention
    (release / "mof.yaml").write_text("a: &x [1]\nb: *x\n")
    broken = audit_folder(release)
    assert "aliases" in _codes(broken)["mof_yaml"][0]
    assert broken.claimed is None and broken.verified is not None


def test_symlinks_are_reported_not_followed(release: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.py"
    secret.write_text("train = 'secret'\n")
    os.symlink(secret, release / "code" / "train_link.py")
    os.symlink(tmp_path, release / "code" / "outside")
    report = audit_folder(release)
    assert len(_codes(report)["symlink"]) == 2
    assert all("secret" not in e for r in report.rows for e in r.evidence)


def test_other_release_conventions(tmp_path: Path) -> None:
    repo = tmp_path / "other"
    repo.mkdir()
    save_file({"w": np.ones((2, 2), dtype=np.float32)}, str(repo / "model.safetensors"))
    (repo / "config.json").write_text('{"model_type": "llama"}')
    (repo / "LICENSE").write_text("Apache License\nVersion 2.0, January 2004\n")
    (repo / "README.md").write_text("---\nlicense: apache-2.0\ntags: ['arxiv:2401.00001']\n---\n")
    (repo / "modeling_tiny.py").write_text("class Tiny: ...\n")
    (repo / "train.py").write_text("print('train')\n")
    (repo / "step-100").mkdir()
    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(repo / "step-100" / "w.safetensors"))
    report = audit_folder(repo)
    assert report.claimed is None
    verified = {r.component for r in report.rows if r.verified}
    assert verified == {
        "Model architecture", "Model parameters (Final)", "Model card", "Training code",
        "Model parameters (Intermediate)", "Research paper",
    }  # fmt: skip
    assert _row(report, "Research paper")["evidence"] == ["arxiv:2401.00001"]
    # architecture, weights, card, and the paper standing in for the technical report
    assert report.verified is not None and report.verified.class_iii == pytest.approx(400 / 6)
    assert {r.license for r in report.rows if r.verified} == {"Apache-2.0"}


def test_dispatch_and_mot_yaml_target(release: Path, tmp_path: Path) -> None:
    amber = audit(str(ASSETS / "models" / "Amber.yml"))
    assert amber.kind == "mot_yaml" and amber.mof_class == 1 and amber.verified is None
    assert _row(amber, "Research paper")["evidence"] == ["arxiv license"]
    mot = parse_mot_yaml(amber.to_mof_yaml(), source="x")
    assert score_release(mot).mof_class == 1
    assert audit(str(release)).kind == "folder"
    assert (
        audit_mot_yaml(
            ASSETS / "fixtures" / "MinimalFile_C1_0%-C2_0%-C3_0%_1C_0G_0L_0V_0I_0T.yml"
        ).mof_class
        == 0
    )
    with pytest.raises(ArtifactError, match=r"does not exist \(a local path, so it was not looked"):
        audit("../no/such/thing")
    with pytest.raises(ArtifactError, match="not a folder, a MOT YAML file or a Hub repo id"):
        audit("org/na--me")
    with pytest.raises(ArtifactError, match="not a folder"):
        audit_folder(tmp_path / "absent")


# --------------------------------------------------------------------------- Hub


def _ops(folder: Path, *, skip: str | None = None) -> list[CommitOperationAdd]:
    return [
        CommitOperationAdd(p.relative_to(folder).as_posix(), p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not (skip and p.relative_to(folder).as_posix().startswith(skip))
    ]


def publish(api: HfApi, bundle: Path) -> None:
    """Release on main, one ``<stage>-step<N>`` branch per checkpoint (Pythia/OLMo layout)."""
    api.create_repo(REPO, exist_ok=True)
    root = api.list_repo_commits(REPO)[-1].commit_id
    api.create_commit(REPO, operations=_ops(bundle, skip="checkpoints/"), commit_message="release")
    for ckpt in sorted((bundle / "checkpoints").glob("*/step-*")):
        name = f"{ckpt.parent.name}-step{ckpt.name.removeprefix('step-')}"
        api.create_branch(REPO, branch=name, revision=root, exist_ok=True)
        api.create_commit(REPO, operations=_ops(ckpt), commit_message=name, revision=name)


def test_hub_repo_audits_class_i_without_downloading_weights(release: Path, hub: HubServer) -> None:
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    publish(api, release)
    before = len(hub.requests("GET", "/resolve/"))
    report = audit_hub_repo(REPO, endpoint=hub.endpoint, token=TOKEN)
    assert report.target == f"hf:{REPO}@main" and report.kind == "hub"
    assert report.problems == [], report.problems
    assert report.mof_class == 1
    assert _row(report, "Model parameters (Intermediate)")["evidence"] == [
        "branch:pretrain-step10", "branch:pretrain-step20",
    ]  # fmt: skip
    assert hub.lfs_bytes_downloaded == 0
    urls = [e.path for e in hub.requests("GET", "/resolve/")[before:]]
    fetched = {url.split("/resolve/", 1)[1].split("/", 1)[1] for url in urls}
    assert not any(p.endswith(".safetensors") for p in fetched)
    assert {"README.md", "mof.yaml", "MANIFEST.json", "data/croissant.json"} <= fetched


def test_hub_errors_are_one_line(hub: HubServer) -> None:
    with pytest.raises(ArtifactError, match="cannot be read") as info:
        audit_hub_repo(f"{USER}/absent", endpoint=hub.endpoint, token=TOKEN)
    assert "\n" not in str(info.value)


def test_every_component_has_a_layout_entry() -> None:
    assert set(LAYOUT) == {c.name for c in mof_components()}
