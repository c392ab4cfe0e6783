"""The loopback Hub answers the real `huggingface_hub` client the way the Hub does."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hubserver import TOKEN, USER, HubServer
from huggingface_hub import CommitOperationAdd, HfApi, RepoFile, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

REPO = f"{USER}/tiny"


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


def _weights(n: int = 4096) -> bytes:
    return bytes(range(256)) * (n // 256)


def test_upload_branch_tag_and_listings(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)
    api.create_repo(REPO, exist_ok=True)
    api.create_repo(REPO, repo_type="dataset", private=True)
    api.create_commit(
        REPO,
        operations=[
            CommitOperationAdd("README.md", b"---\nlicense: apache-2.0\n---\n# tiny\n"),
            CommitOperationAdd("model.safetensors", _weights()),
        ],
        commit_message="release",
    )
    root = api.list_repo_commits(REPO)[-1].commit_id
    api.create_branch(REPO, branch="pretrain-step10", revision=root)
    api.create_branch(REPO, branch="pretrain-step10", exist_ok=True)
    api.create_commit(
        REPO,
        operations=[CommitOperationAdd("model.safetensors", _weights(512))],
        commit_message="step 10",
        revision="pretrain-step10",
    )
    api.create_tag(REPO, tag="v1")

    refs = api.list_repo_refs(REPO)
    assert {b.name for b in refs.branches} == {"main", "pretrain-step10"}
    assert [t.name for t in refs.tags] == ["v1"]
    assert refs.tags[0].target_commit == api.model_info(REPO).sha
    assert api.list_repo_files(REPO, revision="pretrain-step10") == [
        ".gitattributes",
        "model.safetensors",
    ]
    tree = {f.path: f for f in api.list_repo_tree(REPO, recursive=True) if isinstance(f, RepoFile)}
    assert tree["model.safetensors"].lfs is not None
    assert tree["model.safetensors"].lfs.sha256 == hashlib.sha256(_weights()).hexdigest()
    assert tree["README.md"].lfs is None
    info = api.get_paths_info(REPO, ["model.safetensors", "missing"], revision="pretrain-step10")
    assert [i.lfs.size for i in info if isinstance(i, RepoFile) and i.lfs] == [512]
    assert api.whoami()["name"] == USER
    assert api.repo_info(REPO, repo_type="dataset").private is True
    assert hub.lfs_bytes_uploaded == len(_weights()) + 512
    api.delete_branch(REPO, branch="pretrain-step10")
    assert [b.name for b in api.list_repo_refs(REPO).branches] == ["main"]


def test_download_by_revision(api: HfApi, hub: HubServer, tmp_path: Path) -> None:
    api.create_repo(REPO)
    api.create_branch(REPO, branch="sft-step20")
    api.create_commit(
        REPO,
        operations=[
            CommitOperationAdd("config.json", b'{"a": 1}\n'),
            CommitOperationAdd("model.safetensors", _weights()),
        ],
        commit_message="ckpt",
        revision="sft-step20",
    )
    for name in ("config.json", "model.safetensors"):
        local = hf_hub_download(
            REPO, name, revision="sft-step20", endpoint=hub.endpoint, cache_dir=tmp_path / "c"
        )
        assert Path(local).read_bytes() == (b'{"a": 1}\n' if name == "config.json" else _weights())
    assert hub.lfs_bytes_downloaded == len(_weights())
    with pytest.raises(EntryNotFoundError):
        api.hf_hub_download(REPO, "config.json", cache_dir=tmp_path / "c")  # not on main
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(REPO, revision="nope")


def test_lfs_object_already_stored_is_not_sent_again(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)
    op = CommitOperationAdd("a.safetensors", _weights())
    api.preupload_lfs_files(REPO, additions=[op])
    assert hub.lfs_bytes_uploaded == len(_weights())
    api.create_commit(
        REPO,
        operations=[CommitOperationAdd("b.safetensors", _weights())],
        commit_message="same bytes, other name",
    )
    assert hub.lfs_bytes_uploaded == len(_weights())
    assert len(hub.requests("PUT")) == 1


def test_wrong_token_and_private_repo(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO, private=True)
    bad = HfApi(endpoint=hub.endpoint, token="hf_wrong")
    with pytest.raises(HfHubHTTPError) as excinfo:
        bad.create_repo(f"{USER}/other")
    assert excinfo.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        bad.model_info(REPO)
    assert not any(e.mutating for e in hub.log if e.status >= 400)
