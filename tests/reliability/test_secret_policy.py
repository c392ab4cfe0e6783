"""One secret policy (openrelease.secrets): what publish refuses is redacted everywhere else.

One table of cases drives the three places a secret could leave the machine: MLflow params and
tags (a real SQLite store), the files the bundle writer generates from the record, and publish.
"""

from __future__ import annotations

import re
import secrets
import shutil
from pathlib import Path

import pytest
from bundle_factory import write_manifest
from cli_checks import copy_bundle

from openrelease.errors import PublishError
from openrelease.params import PipelineParams
from openrelease.record.tracking import StageTracker
from openrelease.release.files import FilePlan, materialize
from openrelease.release.publish import check_no_secrets

_HEX = secrets.token_hex(24)
_UPPER = "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
CASES = [
    ("a Hugging Face token", "hf_" + _HEX),
    ("a GitHub token", "ghp_" + _HEX),
    ("a GitHub token", "github_pat_" + _HEX),
    ("an AWS access key id", "AKIA" + _UPPER),
    ("an AWS access key id", "ASIA" + _UPPER),
    ("an AWS secret key", "aws_secret_access_key = " + _HEX),
    ("a private key", "-----BEGIN OPENSSH PRIVATE KEY-----"),  # pragma: allowlist secret
    ("the value of $MY_API_KEY", "envsecret" + _HEX),
]
IDS = [f"{i}-{what.split()[-1]}" for i, (what, _) in enumerate(CASES)]


@pytest.fixture(autouse=True)
def _env_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_API_KEY", CASES[-1][1])


@pytest.mark.parametrize(("what", "value"), CASES, ids=IDS)
def test_mlflow_params_and_tags_never_hold_it(
    tmp_path: Path,
    template_db: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_params: PipelineParams,
    what: str,
    value: str,
) -> None:
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("NCCL_ALGO", value)  # a recorded env var: lands in an env.* tag
    data = tiny_params.data.model_copy(update={"out_dir": f"artifacts/data-{value}"})
    params = tiny_params.model_copy(update={"data": data})
    tracker = StageTracker("data", params=params, project_dir=tmp_path, out_dir=tmp_path / "d")
    tracker.start([])
    tracker.finish()
    tracker.send()

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("openrelease").experiment_id])
    recorded = [v for r in runs for v in (*r.data.params.values(), *r.data.tags.values())]
    assert any("[REDACTED]" in v for v in recorded)
    assert [v for v in recorded if value in v] == []


@pytest.mark.parametrize(("what", "value"), CASES, ids=IDS)
def test_bundle_files_written_from_the_record_never_hold_it(
    tmp_path: Path, what: str, value: str
) -> None:
    plan = FilePlan()
    plan.add_text("configs/params.yaml", f"release:\n  paper: 'https://x.org/?k={value}'\n")
    plan.add_json("logs/data/record.json", {"env": {"NCCL_ALGO": value}})
    materialize(plan, tmp_path, link=False, progress=None)
    for rel in plan.files:
        text = (tmp_path / rel).read_text()
        assert "[REDACTED]" in text and value not in text


@pytest.mark.parametrize(("what", "value"), CASES, ids=IDS)
def test_publish_refuses_it(pristine_bundle: Path, tmp_path: Path, what: str, value: str) -> None:
    bundle = copy_bundle(pristine_bundle, tmp_path)
    (bundle / "docs" / "notes.md").write_text(f"setup: {value}\n")
    write_manifest(bundle)
    with pytest.raises(
        PublishError, match=re.escape(f"docs/notes.md contains what looks like {what}")
    ):
        check_no_secrets(bundle, ["docs/notes.md"])
