"""The distill stage: teacher traces (data, trace file, model), training from sft, its record."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from recording import send_stage

from openrelease.data.store import DataStore
from openrelease.digest import hash_folder, sha256_file, sha256_tree
from openrelease.errors import DataError
from openrelease.manifest import StageManifest, StageRecord, read_model
from openrelease.params import PipelineParams, TeacherParams
from openrelease.record.lineage import lineage
from openrelease.train import distill, run_stage
from openrelease.train.checkpoint import final_checkpoint
from openrelease.train.distill import TeacherRecord, distill_pairs, prepare_traces


@pytest.fixture
def store(data_dir: Path) -> DataStore:
    return DataStore(data_dir)


def test_distill_trains_from_dpo_on_the_data_traces(
    project: Path, tiny_params: PipelineParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for stage in ("pretrain", "sft", "dpo"):
        run_stage(stage, tiny_params, project_dir=project)
        send_stage(project, stage)  # what the launcher's recorder does
    report = run_stage("distill", tiny_params, project_dir=project)
    send_stage(project, "distill")
    assert (report.final_step, report.interrupted) == (4, False)

    out = project / "artifacts/distill"
    teacher = read_model(out / "teacher.json", TeacherRecord)
    problems = DataStore(project / "artifacts/data").records("distill")
    assert (teacher.kind, teacher.num_traces) == ("data", len(problems))
    assert teacher.traces_sha256 == sha256_file(out / "traces.jsonl")
    prompt, response = distill_pairs(out)[0]
    assert prompt == problems[0]["prompt"]
    assert response.startswith("<think>") and response.endswith(f"{problems[0]['answer']}.")

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
    manifest = read_model(out / "manifest.json", StageManifest)
    dpo_final = final_checkpoint(project, "dpo")[1]
    assert [c.step for c in manifest.checkpoints] == [2, 4]
    assert manifest.checkpoints[0].parent_digest == dpo_final.checkpoint_digest

    record = read_model(out / "record.json", StageRecord)
    assert record.status == "FINISHED"
    assert [c.checkpoint_digest for c in record.checkpoints] == [
        c.checkpoint_digest for c in manifest.checkpoints
    ]
    inputs = {i.name: i.digest for i in record.inputs}
    assert inputs["teacher-traces"] == teacher.traces_sha256
    assert inputs["teacher"] == teacher.teacher_sha256
    assert inputs["dpo-final"] == dpo_final.checkpoint_digest
    dpo_record = read_model(project / "artifacts/dpo/record.json", StageRecord)
    assert record.parent_run_id == dpo_record.parent_run_id is not None  # one pipeline run
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(str(record.run_id))
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [
        1,
        2,
        3,
        4,
    ]
    nodes = lineage(project, str(out / "checkpoints/step-4")).nodes
    assert [n.name for n in nodes if n.kind == "stage"] == ["pretrain", "sft", "dpo", "distill"]

    # A rerun finds the final state: no work, the same record.
    again = run_stage("distill", tiny_params, project_dir=project)
    assert (again.start_step, again.final_step) == (4, 4)
    rerun = read_model(out / "record.json", StageRecord)
    assert rerun.status == "FINISHED" and rerun.checkpoints == record.checkpoints


def test_trace_file_teacher(store: DataStore, tmp_path: Path) -> None:
    traces = tmp_path / "r1.jsonl"
    traces.write_text(
        json.dumps({"prompt": "What is 2 + 2?", "reasoning": "2 + 2 = 4.", "answer": 4}) + "\n"
    )
    teacher = TeacherParams(kind="trace_file", path="r1.jsonl", revision="abc123")
    out = tmp_path / "out"
    record = prepare_traces(teacher, store=store, project_dir=tmp_path, out_dir=out)
    assert (record.teacher_sha256, record.revision) == (sha256_file(traces), "abc123")
    assert distill_pairs(out) == [("What is 2 + 2?", "<think>2 + 2 = 4.</think> The answer is 4.")]
    traces.write_text('{"prompt": "no reasoning"}\n')
    with pytest.raises(DataError, match=r"r1\.jsonl:1: missing or non-string reasoning, answer"):
        prepare_traces(teacher, store=store, project_dir=tmp_path, out_dir=out)


def _tiny_teacher(store: DataStore, folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(store.tokenizer_dir))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(str(folder))
    shutil.copytree(store.tokenizer_dir, folder, dirs_exist_ok=True)


def test_model_teacher_generates_recorded_traces(
    store: DataStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tiny_teacher(store, tmp_path / "teacher")
    teacher = TeacherParams(
        kind="model", path="teacher", max_new_tokens=4, samples_per_prompt=2, reject_incorrect=False
    )
    out = tmp_path / "out"
    record = prepare_traces(teacher, store=store, project_dir=tmp_path, out_dir=out)
    assert record.num_traces == 2 * len(store.records("distill"))
    assert record.teacher_sha256 == sha256_tree(hash_folder(tmp_path / "teacher"))
    assert record.sampling["temperature"] == 0.7 and record.sampling["samples_per_prompt"] == 2
    assert record.traces_sha256 == sha256_file(out / "traces.jsonl")
    first = (out / "traces.jsonl").read_bytes()

    def no_generation(*args: object) -> object:
        raise AssertionError("unchanged teacher and settings must reuse the traces")

    monkeypatch.setattr(distill, "_generate_traces", no_generation)
    assert prepare_traces(teacher, store=store, project_dir=tmp_path, out_dir=out) == record
    monkeypatch.undo()
    # Seeded sampling: a fresh folder gets the same bytes.
    again = prepare_traces(teacher, store=store, project_dir=tmp_path, out_dir=tmp_path / "again")
    assert (tmp_path / "again/traces.jsonl").read_bytes() == first and again == record
    # A random model never states the right answer: every trace is rejected.
    strict = teacher.model_copy(update={"reject_incorrect": True})
    with pytest.raises(DataError, match="produced no correct trace"):
        prepare_traces(strict, store=store, project_dir=tmp_path, out_dir=tmp_path / "strict")
