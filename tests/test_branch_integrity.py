"""`verify hf:` and `audit` of anyone's repo flag mislabelled checkpoint branches (no downloads).

The defects users found by hand in Pythia (86 of 154 branches serving identical weights) and
OLMo (steps whose token counts go backwards), rebuilt on the loopback Hub.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hubserver import TOKEN, USER, HubServer
from huggingface_hub import CommitOperationAdd, HfApi
from safetensors.numpy import save

from openrelease.audit.report import audit_hub_repo
from openrelease.errors import ArtifactError
from openrelease.layout import format_tokens
from openrelease.verify.hub import verify_hub

REPO = f"{USER}/someone-elses-model"


def _weights(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return save({"w": rng.standard_normal((4, 4)).astype(np.float32)})


def _branch(api: HfApi, name: str, seed: int) -> None:
    api.create_branch(REPO, branch=name)
    ops = [
        CommitOperationAdd("model.safetensors", io.BytesIO(_weights(seed))),
        CommitOperationAdd("config.json", b'{"model_type": "llama"}\n'),
    ]
    api.create_commit(REPO, operations=ops, commit_message=name, revision=name)


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(REPO)
    api.create_commit(
        REPO,
        operations=[CommitOperationAdd("README.md", b"# someone's model\n")],
        commit_message="card",
    )
    return api


def test_verify_flags_duplicate_weights_and_backwards_tokens(api: HfApi, hub: HubServer) -> None:
    _branch(api, "step1000", seed=1)
    _branch(api, "step2000", seed=1)  # Pythia: a later step serving the same weights
    _branch(api, "step3000", seed=3)
    _branch(api, "stage1-step10-tokens5B", seed=10)
    _branch(api, "stage1-step20-tokens4B", seed=20)  # OLMo: tokens go down as steps go up
    _branch(api, "stage1-step30-tokens6B", seed=30)
    report = verify_hub(REPO, endpoint=hub.endpoint, token=TOKEN)
    assert not report.ok
    found = {(p.code, p.path) for p in report.problems}
    assert found == {
        ("no_manifest", "main:MANIFEST.json"),
        ("duplicate_weights", "step2000"),
        ("names_backwards", "stage1-step20-tokens4B"),
    }
    audited = audit_hub_repo(REPO, endpoint=hub.endpoint, token=TOKEN)
    assert {(p.code, p.path) for p in audited.problems} >= {
        ("duplicate_weights", "step2000"),
        ("names_backwards", "stage1-step20-tokens4B"),
    }
    assert hub.lfs_bytes_downloaded == 0


def test_consistent_branches_verify(api: HfApi, hub: HubServer) -> None:
    for i, step in enumerate((100, 200, 300), start=1):
        _branch(api, f"pretrain-step{step}-tokens{format_tokens(step * 4096)}", seed=i)
    report = verify_hub(REPO, endpoint=hub.endpoint, token=TOKEN)
    assert report.ok and [p.code for p in report.problems] == ["no_manifest"]


def test_repo_with_neither_manifest_nor_checkpoints_says_so(api: HfApi, hub: HubServer) -> None:
    with pytest.raises(ArtifactError, match=r"no MANIFEST\.json and no checkpoint branches"):
        verify_hub(REPO, endpoint=hub.endpoint, token=TOKEN)
