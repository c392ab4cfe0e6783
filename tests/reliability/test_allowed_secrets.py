"""A fixture is not a leak: secret-like lines allowed by a pragma or a params rule, and no other.

The fixtures below are built at run time so this file itself holds none.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from bundle_factory import make_bundle, write_manifest
from cli_checks import assert_clean_error, invoke
from hubserver import TOKEN, USER, HubServer
from project_paths import REPO_ROOT

from openrelease.errors import PublishError
from openrelease.manifest import AllowedSecrets, dump_json
from openrelease.params import ReleaseParams
from openrelease.release.publish import check_no_secrets, publish_bundle
from openrelease.secrets import refusal_patterns, scan_file, scan_files

KEY = "-----BEGIN " + "OPENSSH PRIVATE KEY-----"
AWS = "AKIA" + "Q7" * 8
PRAGMA = "# pragma: " + "allowlist secret"
NEXTLINE = "# pragma: " + "allowlist nextline secret"


def _fixture_code(bundle: Path, *, marked: bool) -> None:
    lines = [
        "import pytest",
        f'KEY = "{KEY}"' + (f"  {PRAGMA}" if marked else ""),
        NEXTLINE if marked else "",
        f'AWS = "{AWS}"',
    ]
    (bundle / "code" / "test_fixture.py").write_text("\n".join(lines) + "\n")
    write_manifest(bundle)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path)


def test_pragma_marked_fixture_publishes_and_is_listed(bundle: Path, hub: HubServer) -> None:
    _fixture_code(bundle, marked=True)
    report = publish_bundle(bundle, repo_id=f"{USER}/fx", endpoint=hub.endpoint, token=TOKEN)
    assert report.ok
    found = {(f.path, f.line, f.what, f.allowed_by) for f in report.allowed_secrets}
    assert found == {
        ("code/test_fixture.py", 2, "a private key", "pragma: allowlist secret"),
        ("code/test_fixture.py", 4, "an AWS access key id", "pragma: allowlist secret"),
    }


def test_unmarked_fixture_is_refused_naming_file_line_and_the_fix(
    bundle: Path, hub: HubServer
) -> None:
    _fixture_code(bundle, marked=False)
    args = ["publish", str(bundle), "--repo-id", f"{USER}/fx", "--endpoint", hub.endpoint]
    result = invoke(*args, "--dry-run", env={"HF_TOKEN": TOKEN})
    line = assert_clean_error(
        result,
        match=r"code/test_fixture\.py contains what looks like a private key; remove it "
        r"\(line 2; 1 more\).*pragma: allowlist secret.*release\.allowed_secrets",
    )
    assert KEY not in line and AWS not in line
    assert hub.log == []


def test_params_rule_allows_a_file_with_its_reason(bundle: Path, hub: HubServer) -> None:
    _fixture_code(bundle, marked=False)
    record = {"schema_version": 1, "rules": [{"path": "code/test_*.py", "reason": "fixture"}]}
    (bundle / "allowed_secrets.json").write_text(dump_json(record))
    write_manifest(bundle)
    args = ["publish", str(bundle), "--repo-id", f"{USER}/fx", "--endpoint", hub.endpoint]
    result = invoke(*args, "--dry-run", env={"HF_TOKEN": TOKEN})
    assert result.exit_code == 0, result.output
    assert "allowed secret-like text: code/test_fixture.py:2 (a private key;" in result.output
    assert "release.allowed_secrets: fixture" in result.output
    AllowedSecrets.model_validate_json((bundle / "allowed_secrets.json").read_text())


def test_an_environment_secret_is_never_allowed(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = "envsecret" + "7f3a" * 6
    monkeypatch.setenv("MY_API_KEY", value)
    (bundle / "docs" / "notes.md").write_text(f"key = {value}  {PRAGMA}\n")
    with pytest.raises(PublishError, match=r"the value of \$MY_API_KEY; remove it \(line 1\)"):
        check_no_secrets(bundle, ["docs/notes.md"], [("docs/*", "docs")])


def test_findings_across_chunks_are_counted_once_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    filler = ("x" * 99 + "\n") * 10_490  # ~1 MiB: the key lands on the chunk boundary
    path.write_text(filler + f"{AWS}\n" + f"two {AWS}  {PRAGMA}\n")
    found = scan_file(path, "data/big.txt", refusal_patterns({}))
    assert [(f.line, f.allowed_by) for f in found] == [
        (10_491, None),
        (10_492, "pragma: allowlist secret"),
    ]


def test_release_params_rule_needs_a_reason() -> None:
    with pytest.raises(ValueError, match="reason"):
        ReleaseParams.model_validate(
            {"name": "x", "allowed_secrets": [{"path": "code/*", "reason": ""}]}
        )
    rule = ReleaseParams.model_validate(
        {"name": "x", "allowed_secrets": [{"path": "code/*", "reason": "test fixtures"}]}
    )
    assert json.loads(rule.model_dump_json())["allowed_secrets"][0]["path"] == "code/*"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_this_repository_holds_only_marked_fixtures() -> None:
    """`make demo` ships this repo's source in code/: every secret-like line must be marked."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    files = [f for f in listed if f and (REPO_ROOT / f).is_file()]
    findings = scan_files(REPO_ROOT, files, env={})
    assert findings, "the repo's secret fixtures were not found at all"
    assert [f for f in findings if f.allowed_by is None] == []
