import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from openrelease import __version__
from openrelease.cli import app

runner = CliRunner()


def test_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "data" in result.output and "params" in result.output


def test_usage_error_exits_2() -> None:
    result = runner.invoke(app, ["data", "batch", "--stage", "sft", "--step", "one"])
    assert result.exit_code == 2


def test_unknown_stage_is_one_line_naming_the_stages(project: Path) -> None:
    result = runner.invoke(app, ["data", "batch", "--stage", "nope", "--step", "1"])
    assert result.exit_code == 1
    assert "'nope' is not a training stage" in result.output
    assert "pretrain, sft, dpo, distill, grpo" in result.output


def test_params_show_json(project: Path) -> None:
    result = runner.invoke(app, ["params", "show", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"]["hidden_size"] == 32


def test_params_error_is_one_line_exit_1(project: Path) -> None:
    Path("params.yaml").write_text(
        Path("params.yaml").read_text().replace("seed: 1234", "seed: -1")
    )
    result = runner.invoke(app, ["params", "show"])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error: params.yaml: seed:")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_data_batch_and_where(project: Path) -> None:
    result = runner.invoke(app, ["data", "batch", "--stage", "sft", "--step", "2", "--json"])
    assert result.exit_code == 0, result.output
    batch = json.loads(result.stdout)
    again = json.loads(
        runner.invoke(app, ["data", "batch", "--stage", "sft", "--step", "2", "--json"]).stdout
    )
    assert batch == again and len(batch["samples"]) == 8
    doc = batch["samples"][0]["doc_ids"][0]
    where = runner.invoke(app, ["data", "where", "--doc", doc, "--json"])
    assert where.exit_code == 0, where.output
    assert any(
        s["stage"] == "sft" and 2 in s["steps"] for s in json.loads(where.stdout)["sightings"]
    )
    human = runner.invoke(app, ["data", "batch", "--stage", "pretrain", "--step", "1"])
    assert human.exit_code == 0 and "order digest sha256:" in human.stdout


def test_data_batch_step_out_of_range(project: Path) -> None:
    result = runner.invoke(app, ["data", "batch", "--stage", "pretrain", "--step", "0"])
    assert result.exit_code == 1 and "outside stage pretrain's 1..8" in result.stderr


def test_data_stage_runs_from_cli(project: Path) -> None:
    (project / "artifacts").rename(project / "old-artifacts")
    result = runner.invoke(app, ["data"])
    assert result.exit_code == 0, result.output
    assert "sequences" in result.stdout
    assert (project / "artifacts/data/manifest.json").read_bytes() == (
        project / "old-artifacts/data/manifest.json"
    ).read_bytes()
    summary = runner.invoke(app, ["summary", "--json"])
    stages = {s["stage"]: s for s in json.loads(summary.stdout)["stages"]}
    assert stages["data"]["done"] and not stages["pretrain"]["done"]


def test_missing_data_says_what_to_run(project: Path) -> None:
    import shutil

    shutil.rmtree(project / "artifacts")
    result = runner.invoke(app, ["data", "batch", "--stage", "sft", "--step", "1"])
    assert result.exit_code == 1 and "run the stage that writes it" in result.stderr


def test_real_process_no_traceback_unless_debug(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "openrelease",
        "params",
        "show",
        "--params",
        str(tmp_path / "x.yaml"),
    ]
    env = {**os.environ, "OPENRELEASE_DEBUG": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cp pipelines/tiny.yaml params.yaml" in proc.stderr
    proc = subprocess.run(
        cmd, capture_output=True, text=True, check=False, env={**env, "OPENRELEASE_DEBUG": "1"}
    )
    assert proc.returncode == 1 and "Traceback" in proc.stderr


@pytest.mark.parametrize("args", [["data", "--help"], ["params", "show", "--help"]])
def test_subcommand_help(args: list[str]) -> None:
    assert runner.invoke(app, args).exit_code == 0
