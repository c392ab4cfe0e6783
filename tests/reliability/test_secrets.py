"""Secrets never leak: not into logs, MLflow, the journal, or Hub uploads; publish refuses them.

Tokens are planted in the environment (HF_TOKEN, MY_API_KEY, a password in the tracking URI),
in params.yaml and in a data file; then the real `openrelease data` process runs and every byte
it left behind (stdout, stderr, the MLflow SQLite store and artifacts, the journal, record.json)
is searched. Publishing goes to the loopback Hub, whose stored commits and LFS objects are
searched the same way.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_factory import write_manifest
from cli_checks import assert_clean_error, copy_bundle, invoke
from hubserver import USER, HubServer

PARAMS = (Path(__file__).parents[1] / "assets" / "params_test.yaml").read_text(encoding="utf-8")
HF_SECRET = "hf_" + secrets.token_hex(20)
API_SECRET = "sk-live-" + secrets.token_hex(16)
PARAMS_SECRET = "hf_" + secrets.token_hex(20)
DATA_SECRET = "hf_" + secrets.token_hex(20)
URL_PASSWORD = "pw-" + secrets.token_hex(12)
ENV_SECRETS = (HF_SECRET, API_SECRET)


def _files(root: Path, *, skip: tuple[str, ...] = ()) -> list[Path]:
    """Every regular file under ``root`` except those under the ``skip`` prefixes."""
    return [
        p
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).as_posix().startswith(skip)
    ]


def _holding(paths: list[Path], secret: str) -> list[str]:
    return [str(p) for p in paths if secret.encode() in p.read_bytes()]


def _sqlite_dump(db: Path) -> str:
    """Every row of every table, as SQL text."""
    with sqlite3.connect(db) as conn:
        return "\n".join(conn.iterdump())


def _run_cli(project: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openrelease", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _git(project: Path, *args: str) -> None:
    ident = ["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", *ident, *args], cwd=project, check=True, capture_output=True)


@pytest.fixture
def secret_project(tmp_path: Path) -> Path:
    """A git project whose params.yaml (dirty) and data file hold tokens."""
    project = tmp_path / "project"
    (project / "corpus").mkdir(parents=True)
    docs = [
        {"text": f"Story {i}: the fox keeps its api token {DATA_SECRET} safe."} for i in range(40)
    ]
    (project / "corpus" / "notes.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    imports = "imports: [{format: jsonl, path: corpus/notes.jsonl, role: pretrain}]"
    clean = PARAMS.replace("imports: []", imports)
    (project / "params.yaml").write_text(clean)
    _git(project, "init", "-q")
    _git(project, "add", "params.yaml")
    _git(project, "commit", "-q", "-m", "params")
    paper = f"  paper: https://example.org/report.pdf?token={PARAMS_SECRET}\n"
    dirty = clean.replace("  include_data: true\n", "  include_data: true\n" + paper)
    assert dirty != clean
    (project / "params.yaml").write_text(dirty)  # uncommitted: the run records the diff
    return project


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HF_"))}
    return {
        **env,
        "HF_TOKEN": HF_SECRET,
        "MY_API_KEY": API_SECRET,
        "OPENRELEASE_DEBUG": "",
        **extra,
    }


@pytest.mark.slow
def test_data_stage_keeps_secrets_out_of_logs_and_mlflow(secret_project: Path) -> None:
    project = secret_project
    proc = _run_cli(project, "data", env=_env())
    assert proc.returncode == 0, proc.stderr
    logs = proc.stdout + proc.stderr

    db = project / "mlflow.db"
    dump = _sqlite_dump(db)
    assert "openrelease.run_key" in dump and "pretrain_docs" in dump  # the record is there
    mlflow_files = [db, *_files(project / "mlruns")]
    artifacts = {p.name: p.read_text() for p in _files(project / "mlruns")}
    assert "[REDACTED]" in artifacts["params.resolved.json"]
    assert "[REDACTED]" in artifacts["git.diff"]
    journal = _files(project / ".openrelease")
    record = project / "artifacts" / "data" / "record.json"

    for secret in (*ENV_SECRETS, PARAMS_SECRET, DATA_SECRET):
        assert secret not in logs
        assert secret not in dump
        assert _holding([*mlflow_files, *journal, record], secret) == []
    # The data secret sits only in the data itself; the others nowhere in the project.
    outputs = _files(project, skip=("corpus/", "artifacts/data/", "params.yaml", ".git/"))
    for secret in (*ENV_SECRETS, PARAMS_SECRET, DATA_SECRET):
        assert _holding(outputs, secret) == []
    for secret in ENV_SECRETS:
        assert _holding(_files(project, skip=(".git/",)), secret) == []
    assert _holding(_files(project / "artifacts" / "data"), DATA_SECRET)  # the data went in


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_tracking_outage_keeps_the_uri_password_out_of_logs(secret_project: Path) -> None:
    project = secret_project
    uri = f"http://alice:{URL_PASSWORD}@127.0.0.1:{_closed_port()}"
    env = _env(
        MLFLOW_TRACKING_URI=uri,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="2",
    )
    proc = _run_cli(project, "data", env=env)
    assert proc.returncode == 0, proc.stderr  # tracking is down; the stage still completes
    assert "MLflow unreachable" in proc.stderr
    record = json.loads((project / "artifacts" / "data" / "record.json").read_text())
    assert record["tracking_uri"].startswith("http://alice:[REDACTED]@")
    for secret in (URL_PASSWORD, *ENV_SECRETS, PARAMS_SECRET):
        assert secret not in proc.stdout + proc.stderr
        assert _holding(_files(project, skip=(".git/", "params.yaml")), secret) == []
    sync = _run_cli(project, "tracking", "sync", env=env)  # still down: fails, says so, no leak
    assert sync.returncode == 1 and "still failing" in sync.stderr
    assert URL_PASSWORD not in sync.stdout + sync.stderr


def _hub_bytes(hub: HubServer) -> list[bytes]:
    """Everything the loopback Hub stored: regular blobs of every commit, and LFS objects."""
    blobs = [
        b.data or b""
        for repo in hub.repos.values()
        for commit in repo.commits.values()
        for b in commit.files.values()
    ]
    lfs = [p.read_bytes() for p in _files(hub.root_dir)]
    titles = [c.title.encode() for r in hub.repos.values() for c in r.commits.values()]
    paths = [e.path.encode() for e in hub.log]
    return blobs + lfs + titles + paths


def test_publish_sends_no_secret_to_the_hub(
    hub: HubServer, pristine_bundle: Path, tmp_path: Path
) -> None:
    hub.token = HF_SECRET  # the loopback Hub accepts this token, shaped like a real one
    bundle = copy_bundle(pristine_bundle, tmp_path)
    args = ["publish", str(bundle), "--repo-id", f"{USER}/clean", "--endpoint", hub.endpoint]
    result = invoke(*args, "--yes", env={"HF_TOKEN": HF_SECRET, "MY_API_KEY": API_SECRET})
    assert result.exit_code == 0, result.output
    stored = _hub_bytes(hub)
    assert len(stored) > 20 and hub.lfs_bytes_uploaded > 0
    for secret in ENV_SECRETS:
        assert secret not in result.output
        assert not any(secret.encode() in data for data in stored)


def _write(rel: str, text: str) -> object:
    def plant(bundle: Path) -> None:
        path = bundle / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    return plant


def _in_safetensors_metadata(bundle: Path) -> None:
    header = {"__metadata__": {"note": f"pushed with {HF_SECRET}"}}
    raw = json.dumps(header).encode()
    (bundle / "model" / "extra.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)


def _across_scan_chunks(bundle: Path) -> None:
    """The token straddles the scanner's 1 MiB read boundary."""
    prefix = b"x" * ((1 << 20) - len(HF_SECRET) // 2 - 1) + b" "
    (bundle / "data" / "big.jsonl").write_bytes(prefix + HF_SECRET.encode() + b"\n")


SECRET_CASES = [
    pytest.param(
        _write("configs/params.yaml", f"seed: 0\nhub_token: {HF_SECRET}\n"),
        "configs/params.yaml",
        "a Hugging Face token",
        HF_SECRET,
        id="hf-token-in-params",
    ),
    pytest.param(
        _write("code/train.py", f"API_KEY = '{API_SECRET}'\n"),
        "code/train.py",
        r"the value of \$MY_API_KEY",
        API_SECRET,
        id="env-api-key-in-code",
    ),
    pytest.param(
        # pragma: allowlist nextline secret
        _write("docs/report.md", "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n"),
        "docs/report.md",
        "a private key",
        "MIIEow",
        id="private-key-in-docs",
    ),
    pytest.param(
        _write("data/shards.json", '{"aws": "AKIAZ7Z7Z7Z7Z7Z7Z7Z7"}\n'),  # pragma: allowlist secret
        "data/shards.json",
        "an AWS access key id",
        "AKIAZ7Z7Z7Z7Z7Z7Z7Z7",  # pragma: allowlist secret
        id="aws-key-in-data",
    ),
    pytest.param(
        _write("evals/results.json", '{"by": "ghp_' + "a1B2" * 9 + '"}\n'),
        "evals/results.json",
        "a GitHub token",
        "ghp_a1B2",
        id="github-token-in-evals",
    ),
    pytest.param(
        _in_safetensors_metadata,
        "model/extra.safetensors",
        "a Hugging Face token",
        HF_SECRET,
        id="hf-token-in-safetensors-metadata",
    ),
    pytest.param(
        _across_scan_chunks,
        "data/big.jsonl",
        "a Hugging Face token",
        HF_SECRET,
        id="hf-token-across-scan-chunks",
    ),
]


@pytest.mark.parametrize(("plant", "rel", "what", "secret"), SECRET_CASES)
@pytest.mark.parametrize("dry_run", [False, True], ids=["publish", "dry-run"])
def test_publish_refuses_secret_like_content(
    hub: HubServer,
    pristine_bundle: Path,
    tmp_path: Path,
    plant: object,
    rel: str,
    what: str,
    secret: str,
    dry_run: bool,
) -> None:
    bundle = copy_bundle(pristine_bundle, tmp_path)
    assert callable(plant)
    plant(bundle)
    write_manifest(bundle)
    args = ["publish", str(bundle), "--repo-id", f"{USER}/leaky", "--endpoint", hub.endpoint]
    args += ["--dry-run"] if dry_run else ["--yes"]
    result = invoke(*args, env={"HF_TOKEN": "hf_loopback_test_token", "MY_API_KEY": API_SECRET})
    line = assert_clean_error(result, match=rf"{rel} contains what looks like {what}; remove it")
    assert secret not in result.output and secret not in line
    assert hub.log == [] and hub.repos == {}  # refused before talking to the Hub
