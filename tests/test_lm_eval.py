"""lm-evaluation-harness: parity with the `lm_eval` CLI, the eval stage's record, the card.

Tasks are local YAML + JSON lines (tests/assets/lm_eval); nothing leaves 127.0.0.1.
"""

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from project_paths import ASSETS
from typer.testing import CliRunner

from openrelease.cli import app
from openrelease.errors import ParamsError
from openrelease.manifest import EvalResult
from openrelease.params import LmEvalParams, PipelineParams

pytestmark = pytest.mark.slow
TASKS = ("ortest_mc", "ortest_gen")


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No Hub, no downloads; a private datasets cache; bootstraps in-process (deterministic)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A tiny random Llama with the data stage's tokenizer: scores in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt") / "step-1"
    cfg = LlamaConfig(
        vocab_size=len(
            json.loads((data_dir / "tokenizer/tokenizer.json").read_text())["model"]["vocab"]
        ),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    for f in (data_dir / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    return out


def _with_tasks(project: Path) -> Path:
    shutil.copytree(ASSETS / "lm_eval", project / "lm_eval_tasks")
    return project / "lm_eval_tasks"


def _cli_scores(checkpoint: Path, project: Path) -> dict[str, dict[str, float]]:
    """The same tasks scored by lm-eval's own CLI (`--model hf`), in a subprocess."""
    lm_eval = Path(sys.executable).with_name("lm_eval")
    subprocess.run(
        [
            str(lm_eval),
            "--model",
            "hf",
            "--model_args",
            f"pretrained={checkpoint}",
            "--tasks",
            ",".join(TASKS),
            "--include_path",
            "lm_eval_tasks",
            "--batch_size",
            "1",
            "--seed",
            "1234",
            "--output_path",
            "cli_out",
        ],
        cwd=project,
        env=os.environ.copy(),
        check=True,
        capture_output=True,
        timeout=600,
    )
    (path,) = glob.glob(str(project / "cli_out/**/results_*.json"), recursive=True)
    results = json.loads(Path(path).read_text())["results"]
    return {
        task: {k: v for k, v in results[task].items() if k not in ("name", "alias", "sample_len")}
        for task in TASKS
    }


def test_openrelease_eval_matches_lm_eval_cli(checkpoint: Path, project: Path) -> None:
    _with_tasks(project)
    args = ["eval", "--checkpoint", str(checkpoint), "--include-path", "lm_eval_tasks"]
    result = CliRunner().invoke(app, [*args, "--task", TASKS[0], "--task", TASKS[1], "--json"])
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout)
    theirs = _cli_scores(checkpoint, project)
    for task in TASKS:
        assert ours["tasks"][task]["scores"] == theirs[task], task
    mc, gen = ours["tasks"]["ortest_mc"], ours["tasks"]["ortest_gen"]
    # Not a degenerate comparison: chance-level accuracy and a non-zero chrF of random text.
    assert 0.0 < mc["scores"]["acc,none"] < 1.0
    assert gen["scores"]["chrf,none"] > 0.0
    assert mc["output_type"] == "multiple_choice" and gen["output_type"] == "generate_until"
    assert mc["num_samples"] == 12 and gen["num_samples"] == 8
    assert mc["prompt"]["doc_to_text"] == "Question: {{question}}\nAnswer:"
    assert ours["harness_version"] == "0.4.13" and ours["seed"] == 1234


def test_one_checkpoint_errors_name_the_fix(checkpoint: Path, project: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["eval", "--checkpoint", str(checkpoint), "--task", "no_such"])
    assert missing.exit_code == 1
    assert "lm-eval knows no task 'no_such'" in missing.output
    assert "Traceback" not in missing.output
    alone = runner.invoke(app, ["eval", "--task", "openrelease_arith_mc"])
    assert alone.exit_code == 2 and "give both" in alone.output
    empty = runner.invoke(
        app, ["eval", "--checkpoint", str(project), "--task", "openrelease_arith_mc"]
    )
    assert empty.exit_code == 1 and "holds no config.json" in empty.output


def test_packaged_tasks_score_from_any_folder(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from openrelease.eval.harness import score_checkpoint

    monkeypatch.chdir(tmp_path)  # the package's tasks read their data beside the YAML, not from cwd
    params = LmEvalParams(tasks=("openrelease_arith_mc", "openrelease_arith_gen"), limit=4)
    record = score_checkpoint(checkpoint, params)
    assert set(record.tasks) == {"openrelease_arith_mc", "openrelease_arith_gen"}
    assert record.tasks["openrelease_arith_mc"].num_samples == 4
    assert "exact_match,last_answer" in record.tasks["openrelease_arith_gen"].scores


def test_checkpoint_choice() -> None:
    from openrelease.eval.harness import chosen_steps
    from openrelease.manifest import CheckpointMeta

    metas = [
        CheckpointMeta.model_construct(step=s) for s in (10, 20, 30, 40, 50)
    ]  # only .step is read
    tasks = ("openrelease_arith_mc",)
    every = LmEvalParams(tasks=tasks, checkpoints="every_k", every_k=2)
    assert chosen_steps(metas, every) == {20, 40, 50}
    assert chosen_steps(metas, LmEvalParams(tasks=tasks, checkpoints="finals")) == {50}
    assert chosen_steps(metas, LmEvalParams(tasks=tasks, checkpoints="all")) == {10, 20, 30, 40, 50}
    assert chosen_steps(metas, LmEvalParams()) == set()


def test_bad_include_path_is_a_params_error(tmp_path: Path) -> None:
    from openrelease.eval.harness import task_manager

    with pytest.raises(ParamsError, match="is not a folder"):
        task_manager(TASKS, tmp_path / "nope")


def _record_checkpoints(project: Path, params: PipelineParams, stage: str) -> None:
    """What the trainer records: a run whose checkpoints are MLflow LoggedModels."""
    from openrelease.manifest import StageManifest
    from openrelease.record.tracking import StageTracker

    stage_dir = project / "artifacts" / stage
    manifest = StageManifest.model_validate_json((stage_dir / "manifest.json").read_text())
    tracker = StageTracker(stage, params=params, project_dir=project, out_dir=stage_dir)
    tracker.start([])
    for meta in manifest.checkpoints:
        tracker.log_checkpoint(meta, path=stage_dir / "checkpoints" / f"step-{meta.step}")
    tracker.finish()
    tracker.send()  # what the recorder beside the trainer does


def test_eval_stage_records_lm_eval_everywhere(
    project: Path,
    tiny_params: PipelineParams,
    template_db: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from huggingface_hub.repocard_data import eval_results_to_model_index
    from mlflow import MlflowClient
    from test_evaluation import _fake_stage

    from openrelease.eval.stage import run_eval_stage
    from openrelease.release.model_index import harness_eval_results

    db = project / "mlflow.db"
    shutil.copy(template_db, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    _with_tasks(project)
    _fake_stage(project, tiny_params, "pretrain", [2, 4])
    _fake_stage(project, tiny_params, "sft", [2])
    lm_eval = LmEvalParams(tasks=TASKS, include_path="lm_eval_tasks", limit=4, batch_size=2)
    builtin = {"tasks": ("heldout_loss",), "num_samples": 0}  # keep the built-in part quick
    params = tiny_params.model_copy(
        update={"eval": tiny_params.eval.model_copy(update={"lm_eval": lm_eval, **builtin})}
    )
    _record_checkpoints(project, params, "pretrain")  # their LoggedModels get the scores
    caplog.set_level(logging.INFO, logger="openrelease")
    summary = run_eval_stage(params, project_dir=project, log_every_s=0.2)

    scored = {(r.stage, r.step): r.lm_eval for r in summary.results}
    assert scored[("pretrain", 2)] is None  # checkpoints: finals
    final = scored[("pretrain", 4)]
    assert final is not None and set(final.tasks) == set(TASKS)
    assert final.harness_version == "0.4.13" and final.limit == 4 and final.seed == 1234
    assert final.tasks["ortest_mc"].config_hash.startswith("sha256:")
    assert final.tasks["ortest_mc"].num_fewshot == 0
    on_disk = EvalResult.model_validate_json(
        (project / "artifacts/eval/results/pretrain/step-4.json").read_text()
    )
    assert on_disk.lm_eval == final

    metrics = json.loads((project / "artifacts/eval/lm_eval.json").read_text())
    by_digest = {r.checkpoint_digest: r for r in summary.results if r.lm_eval}
    assert set(metrics) == set(by_digest)
    entry = metrics[on_disk.checkpoint_digest]
    assert entry["stage"] == "pretrain" and entry["step"] == 4
    assert entry["tasks"]["ortest_mc"]["scores"] == final.tasks["ortest_mc"].scores
    csv = (project / "artifacts/eval/lm_eval.csv").read_text().splitlines()
    assert csv[0].startswith("stage,step,tokens_seen,total_tokens_seen,checkpoint_digest,")
    assert "lm_eval/ortest_mc/acc" in csv[0].split(",")
    sft_row = next(line for line in csv if line.startswith("sft,"))
    assert sft_row.split(",")[3] == str(4 * 512 + 2 * 512)  # tokens over both stages
    assert any(Path(p).name == "lm_eval_scores.png" for p in summary.plots)

    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("eval: pretrain step 4: lm-eval ortest_mc, ortest_gen") for m in messages
    )
    assert any(m.startswith("eval: still ") for m in messages)  # the heartbeat

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run_id = json.loads((project / "artifacts/eval/record.json").read_text())["run_id"]
    history = client.get_metric_history(run_id, "pretrain/lm_eval/ortest_mc/acc")
    assert [(m.step, m.value) for m in history] == [
        (4, final.tasks["ortest_mc"].scores["acc,none"])
    ]

    (model,) = [
        m
        for m in client.search_logged_models([client.get_run(run_id).info.experiment_id])
        if m.name == "pretrain-step4"
    ]
    assert model.tags["lm_eval.version"] == "0.4.13"
    assert model.tags["lm_eval.ortest_mc.config_hash"] == final.tasks["ortest_mc"].config_hash
    assert json.loads(model.tags["lm_eval.ortest_gen.prompt"])["doc_to_text"] == "{{opening}}"
    assert "pretrain/lm_eval/ortest_gen/chrf" in {m.key for m in model.metrics}

    card = eval_results_to_model_index("tiny", harness_eval_results(on_disk))[0]["results"]
    by_task = {r["dataset"]["name"]: r for r in card}
    assert by_task["ortest_mc"]["task"]["type"] == "multiple-choice"
    assert by_task["ortest_gen"]["task"]["type"] == "text-generation"
    assert by_task["ortest_mc"]["source"]["name"] == "lm-evaluation-harness 0.4.13"
    acc = next(m for m in by_task["ortest_mc"]["metrics"] if m["type"] == "acc")
    assert acc["value"] == round(final.tasks["ortest_mc"].scores["acc,none"], 6)
    assert acc["args"]["config_hash"] == final.tasks["ortest_mc"].config_hash
    assert acc["args"]["checkpoint_digest"] == on_disk.checkpoint_digest
    assert len(harness_eval_results(on_disk)) == 4  # acc, acc_norm, exact_match, chrf

    again = run_eval_stage(params, project_dir=project)
    assert again.evaluated == 0
    (project / "lm_eval_tasks/ortest_mc.yaml").write_text(
        (project / "lm_eval_tasks/ortest_mc.yaml").read_text().replace("Answer:", "A:")
    )
    edited = run_eval_stage(params, project_dir=project)  # a task YAML edit re-evaluates
    assert edited.evaluated == 3
