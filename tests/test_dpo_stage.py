"""The dpo stage end to end: pairs, the frozen reference, metrics, record, exact 2-rank resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from recording import send_stage
from torchrun_jobs import kill_then_resume, start_torchrun

from openrelease.digest import sha256_file
from openrelease.manifest import StageRecord, read_model
from openrelease.params import load_params
from openrelease.train import run_stage
from openrelease.train.checkpoint import final_checkpoint, list_checkpoints

DPO_METRICS = (
    "loss",
    "reward_margin",
    "preference_accuracy",
    "reward_chosen",
    "reward_rejected",
    "logp_chosen",
    "logp_rejected",
)
ENTRY = """\
import logging
import sys
from pathlib import Path

from openrelease.train import main_from_cli

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = main_from_cli(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
    sys.exit(143 if report.interrupted else 0)
"""


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, built_project: Path) -> Path:
    """A project that ran pretrain and sft (1 process), with a dpo section to test."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("dpo")
    project = root / "proj"
    shutil.copytree(built_project, project)
    MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}").search_experiments()
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["dpo"].update(num_steps=5, state_every=1, lr=3e-3)
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(project / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for stage in ("pretrain", "sft"):
            assert not run_stage(stage, params, project_dir=project).interrupted
    return project


@pytest.fixture
def proj(tuned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    dst = tmp_path / "proj"
    shutil.copytree(tuned, dst)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(dst)
    return dst


def _metrics(project: Path) -> list[dict[str, float]]:
    text = (project / "artifacts/dpo/metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_dpo_trains_against_its_starting_weights_and_records_the_run(proj: Path) -> None:
    from mlflow import MlflowClient

    params = load_params(proj / "params.yaml")
    report = run_stage("dpo", params, project_dir=proj)
    assert (report.final_step, report.interrupted) == (5, False)
    send_stage(proj, "dpo")  # what the launcher's recorder does

    rows = _metrics(proj)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r[k]) for r in rows for k in DPO_METRICS)
    # Step 1 scores the batch before any update: the policy is its reference, so every margin
    # is 0, no pair is won yet and the sigmoid loss is log 2.
    first = rows[0]
    assert first["reward_margin"] == first["reward_chosen"] == first["reward_rejected"] == 0.0
    assert first["preference_accuracy"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["logp_chosen"] < 0 and first["logp_rejected"] < 0
    assert rows[-1]["reward_margin"] > 0 and rows[-1]["loss"] < math.log(2)

    sft_final = final_checkpoint(proj, "sft")[1]
    metas = list_checkpoints(proj / "artifacts/dpo/checkpoints")
    assert [m.step for m in metas] == [2, 4, 5]
    assert metas[0].parent_digest == sft_final.checkpoint_digest
    record = read_model(proj / "artifacts/dpo/record.json", StageRecord)
    assert record.status == "FINISHED"
    inputs = {i.name: i for i in record.inputs}
    assert inputs["reference"].digest == inputs["sft-final"].digest == sft_final.checkpoint_digest
    assert inputs["reference"].kind == "reference-checkpoint"
    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    history = client.get_metric_history(str(record.run_id), "reward_margin")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]


def test_a_named_reference_replaces_the_starting_weights(proj: Path) -> None:
    raw = yaml.safe_load((proj / "params.yaml").read_text())
    raw["dpo"].update(num_steps=2, reference="pretrain")
    (proj / "params.yaml").write_text(yaml.safe_dump(raw))
    run_stage("dpo", load_params(proj / "params.yaml"), project_dir=proj)

    record = read_model(proj / "artifacts/dpo/record.json", StageRecord)
    inputs = {i.name: i.digest for i in record.inputs}
    assert inputs["reference"] == final_checkpoint(proj, "pretrain")[1].checkpoint_digest
    assert inputs["sft-final"] == final_checkpoint(proj, "sft")[1].checkpoint_digest
    assert _metrics(proj)[0]["reward_margin"] != 0.0  # the policy is not its reference


# --------------------------------------------------------------------------- 2 ranks, torchrun


def _dpo_job(project: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return start_torchrun(project, ENTRY, "dpo", env=env)


def _checkpoint_hashes(project: Path) -> dict[str, str]:
    folder = project / "artifacts/dpo/checkpoints"
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*.safetensors"))
    }


@pytest.mark.slow
def test_two_rank_dpo_killed_and_resumed_matches(proj: Path, tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    shutil.copytree(proj, killed)
    kill_then_resume(_dpo_job, proj, killed, "dpo")

    want = _checkpoint_hashes(proj)
    assert sorted(want) == [f"step-{s}/model.safetensors" for s in (2, 4, 5)]
    assert _checkpoint_hashes(killed) == want

    def timeless(project: Path) -> list[dict[str, float]]:
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in _metrics(project)]

    assert timeless(killed) == timeless(proj)  # the resumed run logs the same numbers
    record = read_model(killed / "artifacts/dpo/record.json", StageRecord)
    assert record.status == "FINISHED" and record.environment["world_size"] == "2"
