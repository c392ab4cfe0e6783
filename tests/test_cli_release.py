"""The release commands end to end through the CLI: verify, audit, publish, train --dry-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bundle_factory import make_bundle
from hubserver import TOKEN, USER, HubServer
from typer.testing import CliRunner

from openrelease.cli import app

runner = CliRunner()


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path, num_checkpoints=2)


def test_verify_ok_and_json(bundle: Path) -> None:
    result = runner.invoke(app, ["verify", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "OK" in result.stdout
    result = runner.invoke(app, ["verify", str(bundle), "--json"])
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["num_files"] > 5


def test_verify_tampered_exits_1_naming_the_file(bundle: Path) -> None:
    weights = bundle / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", str(bundle)])
    assert result.exit_code == 1
    assert "changed: model/model.safetensors" in result.stdout


def test_verify_missing_folder_is_one_line_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["verify", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_audit_mot_yaml_and_require_class() -> None:
    yaml_path = Path(__file__).parent / "assets" / "mof" / "fixtures"
    example = sorted(yaml_path.rglob("*.yml")) + sorted(yaml_path.rglob("*.yaml"))
    assert example, "MOT fixtures are missing"
    result = runner.invoke(app, ["audit", str(example[0]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "mot_yaml" and report["mof_class"] in (0, 1, 2, 3)
    strict = runner.invoke(app, ["audit", str(example[0]), "--require-class", "I"])
    assert strict.exit_code == (0 if report["mof_class"] == 1 else 1)


def test_audit_folder_markdown_and_write_mof(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "mof.yaml"
    result = runner.invoke(app, ["audit", str(bundle), "--markdown", "--write-mof", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("## MOF audit of")
    assert "release:" in out.read_text()


def test_audit_bad_target_exits_1(tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", "not a thing"])
    assert result.exit_code == 1 and "'not a thing' does not exist" in result.stderr


def test_audit_bad_class_is_usage_error(bundle: Path) -> None:
    result = runner.invoke(app, ["audit", str(bundle), "--require-class", "IV"])
    assert result.exit_code == 2


def test_publish_dry_run_then_publish_and_verify_hub(
    bundle: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = f"{USER}/cli-release"
    args = ["publish", str(bundle), "--repo-id", repo, "--endpoint", hub.endpoint]
    dry = runner.invoke(app, [*args, "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] and plan["num_uploaded_bytes"] > 0
    assert not hub.requests("POST") and not hub.requests("PUT")

    no_token = runner.invoke(app, [*args, "--yes"])
    assert no_token.exit_code == 1 and "HF_TOKEN" in no_token.stderr

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    done = runner.invoke(app, [*args, "--yes", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["ok"] is True
    assert TOKEN not in done.output

    check = runner.invoke(app, ["verify", f"hf:{repo}", "--endpoint", hub.endpoint, "--json"])
    assert check.exit_code == 0, check.output
    assert json.loads(check.stdout)["ok"] is True


def test_train_dry_run_prints_launcher(project: Path) -> None:
    result = runner.invoke(app, ["train", "pretrain", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    argv = json.loads(result.stdout)["argv"]
    assert argv[-4:] == ["train", "pretrain", "--params", "params.yaml"]


def test_train_unknown_stage_is_one_line_naming_the_stages(project: Path) -> None:
    """Stage names come from params `stages` (any name), so an unknown one is exit 1, not 2."""
    assert runner.invoke(app, ["train"]).exit_code == 2  # the stage argument is missing
    result = runner.invoke(app, ["train", "nope"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "'nope' is not a training stage" in lines[0], result.output


def test_publish_confirmation_shows_the_plan_and_hashes_the_bundle_once(
    bundle: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from openrelease.verify import bundle as verify

    calls: list[Path] = []
    real = verify.verify_bundle

    def counting(path: Path, **kw: object) -> object:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(verify, "verify_bundle", counting)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    args = ["publish", str(bundle), "--repo-id", f"{USER}/asked", "--endpoint", hub.endpoint]
    declined = runner.invoke(app, args, input="n\n")
    assert declined.exit_code == 1 and "would upload" in declined.stdout
    assert not hub.requests("POST")
    calls.clear()
    done = runner.invoke(app, args, input="y\n")
    assert done.exit_code == 0, done.output
    assert "uploaded" in done.stdout and len(calls) == 1
