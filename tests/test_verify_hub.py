from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from bundle_factory import make_bundle, write_checkpoint_meta, write_manifest
from hubserver import TOKEN, USER, HubServer
from huggingface_hub import CommitOperationAdd, HfApi

from openrelease.errors import ArtifactError
from openrelease.manifest import BundleManifest, CheckpointMeta, read_model
from openrelease.release.publish import publish_bundle
from openrelease.verify.bundle import VerifyReport, verify_bundle
from openrelease.verify.hub import verify_hub

REPO = f"{USER}/tiny-open-llm"


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


def _ops(folder: Path) -> list[CommitOperationAdd]:
    return [
        CommitOperationAdd(p.relative_to(folder).as_posix(), p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]


def _publish(hub: HubServer, bundle: Path, *, check: bool = True) -> None:
    """Publish with the real publisher: model on main, checkpoints on branches, data repo.

    ``check=False`` stands for a publisher that never verified (how mislabelled Pythia and
    OLMo branches reached the Hub).
    """
    verify = (
        verify_bundle if check else lambda d: verify_bundle(d).model_copy(update={"problems": []})
    )
    publish_bundle(bundle, repo_id=REPO, endpoint=hub.endpoint, token=TOKEN, verify=verify)


def _upload_as_is(api: HfApi, bundle: Path) -> None:
    """Another layout verify accepts: the bundle folder copied onto main unchanged."""
    api.create_repo(REPO)
    api.create_commit(REPO, operations=_ops(bundle), commit_message="release")


def _verify(hub: HubServer) -> VerifyReport:
    return verify_hub(REPO, endpoint=hub.endpoint, token=TOKEN)


def _codes(report: VerifyReport) -> dict[str, set[str | None]]:
    out: dict[str, set[str | None]] = {}
    for p in report.problems:
        out.setdefault(p.code, set()).add(p.path)
    return out


def test_published_release_verifies_without_downloading_weights(
    tmp_path: Path, api: HfApi, hub: HubServer
) -> None:
    bundle = make_bundle(tmp_path, num_sft_checkpoints=1)
    _publish(hub, bundle)
    report = _verify(hub)
    assert report.ok, report.problems
    assert report.problems == []
    assert report.num_files == len(read_model(bundle / "MANIFEST.json", BundleManifest).files)
    assert report.target == f"hf:{REPO}@main"
    assert hub.lfs_bytes_downloaded == 0
    downloads = {e.path.rsplit("/", 1)[-1] for e in hub.requests("GET", "/resolve/")}
    assert downloads == {"MANIFEST.json", "meta.json"}


def test_release_with_checkpoints_on_main_verifies(
    tmp_path: Path, api: HfApi, hub: HubServer
) -> None:
    _upload_as_is(api, make_bundle(tmp_path))
    assert _verify(hub).problems == []


def test_tampered_branch_weights_are_named(tmp_path: Path, api: HfApi, hub: HubServer) -> None:
    bundle = make_bundle(tmp_path)
    _publish(hub, bundle)
    other = (bundle / "checkpoints/pretrain/step-20/model.safetensors").read_bytes()
    api.create_commit(
        REPO,
        operations=[CommitOperationAdd("model.safetensors", other)],
        commit_message="oops",
        revision="pretrain-step10",
    )
    report = _verify(hub)
    assert report.changed == ["checkpoints/pretrain/step-10/model.safetensors"]
    codes = _codes(report)
    assert codes["checkpoint_files"] == {"pretrain-step10/model.safetensors"}
    assert codes["duplicate_weights"] == {"pretrain-step20"}


def test_identical_weights_under_two_step_names_are_flagged(
    tmp_path: Path, api: HfApi, hub: HubServer
) -> None:
    bundle = make_bundle(tmp_path, num_checkpoints=3)
    ckpts = bundle / "checkpoints/pretrain"
    shutil.copy(ckpts / "step-20/model.safetensors", ckpts / "step-30/model.safetensors")
    parent = read_model(ckpts / "step-20/meta.json", CheckpointMeta).checkpoint_digest
    write_checkpoint_meta(ckpts / "step-30", stage="pretrain", step=30, parent_digest=parent)
    write_manifest(bundle)
    _publish(hub, bundle, check=False)
    assert _codes(_verify(hub)) == {"duplicate_weights": {"pretrain-step30"}}


def test_missing_branch_and_extra_file(tmp_path: Path, api: HfApi, hub: HubServer) -> None:
    bundle = make_bundle(tmp_path)
    _publish(hub, bundle)
    api.delete_branch(REPO, branch="pretrain-step20")
    api.create_commit(
        REPO, operations=[CommitOperationAdd("notes.txt", b"hi\n")], commit_message="extra"
    )
    report = _verify(hub)
    assert set(report.missing) == {
        f"checkpoints/pretrain/step-20/{n}"
        for n in ("config.json", "meta.json", "model.safetensors")
    }
    assert report.extra == ["main:notes.txt"]


def test_unknown_repo_is_an_artifact_error(hub: HubServer) -> None:
    with pytest.raises(ArtifactError, match="cannot be read"):
        _verify(hub)


def test_repo_without_manifest_is_an_artifact_error(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)
    with pytest.raises(ArtifactError, match=r"has no MANIFEST\.json"):
        _verify(hub)


def test_rewritten_or_hostile_branch_meta(tmp_path: Path, api: HfApi, hub: HubServer) -> None:
    bundle = make_bundle(tmp_path)
    _publish(hub, bundle)
    meta = read_model(bundle / "checkpoints/pretrain/step-20/meta.json", CheckpointMeta)
    forged = meta.model_copy(update={"parent_digest": "sha256:" + "0" * 64})
    api.create_commit(
        REPO,
        operations=[CommitOperationAdd("meta.json", forged.model_dump_json().encode())],
        commit_message="forge",
        revision="pretrain-step20",
    )
    codes = _codes(_verify(hub))
    assert codes == {
        "changed_file": {"checkpoints/pretrain/step-20/meta.json"},
        "parent_chain": {"pretrain-step20"},
    }
    api.create_commit(
        REPO,
        operations=[CommitOperationAdd("meta.json", b"[" * 100_000 + b"]" * 100_000)],
        commit_message="nest",
        revision="pretrain-step10",
    )
    codes = _codes(_verify(hub))
    assert codes["checkpoint_meta"] == {"pretrain-step10"}
