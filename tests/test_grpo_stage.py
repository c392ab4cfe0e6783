"""The grpo stage end to end: rollouts on the sharded policy, metrics, record, exact resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from recording import send_stage
from torchrun_jobs import kill_then_resume, start_torchrun

from openrelease.data.store import DataStore
from openrelease.manifest import StageRecord, read_model
from openrelease.params import PipelineParams, load_params
from openrelease.train import rl, run_stage
from openrelease.train.checkpoint import final_checkpoint, list_checkpoints
from openrelease.train.distributed import DistContext
from openrelease.train.job import TrainJob

GRPO_METRICS = ("reward", "accuracy", "format", "kl", "clip_frac", "response_len")
TORCHRUN = Path(sys.executable).parent / "torchrun"
ENTRY = """\
import logging
import sys
from pathlib import Path

from openrelease.train import rl, main_from_cli


def variety(text, answer, num_tokens):
    return len(set(text)) / 10.0


if __name__ == "__main__":
    rl.REWARDS["length"] = variety  # a reward that varies between random rollouts
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = main_from_cli(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
    sys.exit(143 if report.interrupted else 0)
"""


def variety(text: str, answer: str, num_tokens: int) -> float:
    """Rewards distinct characters: random rollouts differ, so advantages are non-zero."""
    return len(set(text)) / 10.0


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory, built_project: Path) -> Path:
    """A project that ran pretrain, sft, dpo and distill (1 process), with a grpo section."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("grpo")
    template = root / "template.db"
    MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
    project = root / "proj"
    shutil.copytree(built_project, project)
    shutil.copy(template, project / "mlflow.db")
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["grpo"].update(
        num_steps=5,
        lr=3e-3,
        state_every=1,
        ppo_epochs=2,
        rewards={"correctness": 1.0, "format": 0.2, "length": 1.0},
    )
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(project / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for stage in ("pretrain", "sft", "dpo", "distill"):
            assert not run_stage(stage, params, project_dir=project).interrupted
    return project


@pytest.fixture
def proj(distilled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the distilled project; the test reward is patched in."""
    dst = tmp_path / "proj"
    shutil.copytree(distilled, dst)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(rl.REWARDS, "length", variety)
    monkeypatch.chdir(dst)
    return dst


def _metrics(project: Path) -> list[dict[str, float]]:
    text = (project / "artifacts/grpo/metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def _record(project: Path) -> StageRecord:
    return read_model(project / "artifacts/grpo/record.json", StageRecord)


def test_grpo_trains_logs_and_records_the_run(proj: Path) -> None:
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    params = load_params(proj / "params.yaml")
    report = run_stage("grpo", params, project_dir=proj)
    assert (report.final_step, report.interrupted) == (5, False)
    send_stage(proj, "grpo")  # what the launcher's recorder does
    rows = _metrics(proj)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for row in rows:
        for key in ("loss", "grad_norm", *GRPO_METRICS):
            assert math.isfinite(row[key]), (key, row)
        assert 0.0 <= row["clip_frac"] <= 1.0 and row["kl"] >= 0.0
        assert 1.0 <= row["response_len"] <= params.grpo.max_new_tokens
    assert rows[0]["kl"] == 0.0  # the policy starts as the reference
    assert rows[-1]["kl"] > 0.0 and max(r["grad_norm"] for r in rows) > 0.0
    assert len({r["reward"] for r in rows}) > 1

    distill_final = final_checkpoint(proj, "distill")[1]
    metas = list_checkpoints(proj / "artifacts/grpo/checkpoints")
    assert [m.step for m in metas] == [2, 4, 5]
    assert metas[0].parent_digest == distill_final.checkpoint_digest
    assert metas[0].samples_seen == 2 * params.grpo.global_batch_size
    model = AutoModelForCausalLM.from_pretrained(str(proj / "artifacts/grpo/checkpoints/step-5"))
    assert model.config.hidden_size == params.model.hidden_size

    record = _record(proj)
    assert record.status == "FINISHED" and record.finished is not None
    assert [c.checkpoint_digest for c in record.checkpoints] == [m.checkpoint_digest for m in metas]
    inputs = {i.name: i for i in record.inputs}
    assert inputs["reference"].digest == distill_final.checkpoint_digest
    assert {"data-manifest", "tokenizer", "distill-final"} <= set(inputs)
    assert record.final_metrics["reward"] == rows[-1]["reward"]
    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    run = client.get_run(str(record.run_id))
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == record.parent_run_id
    for key in ("loss", "lr", "grad_norm", "reward", "kl", "response_len"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4, 5], key
    models = client.search_logged_models([run.info.experiment_id])
    tags = {m.tags["checkpoint_digest"] for m in models if m.tags.get("stage") == "grpo"}
    assert tags == {m.checkpoint_digest for m in metas}


class _SigtermAtPrepare:
    """Wrap an objective so the process gets SIGTERM while preparing its ``at``-th step."""

    def __init__(self, inner: object, at: int) -> None:
        self.inner, self.at, self.calls = inner, at, 0

    def start(self, job: TrainJob, ctx: DistContext) -> None:
        self.inner.start(job, ctx)  # type: ignore[attr-defined]

    def prepare(self, indices: list[int], *, job: TrainJob, step: int) -> object:
        self.calls += 1
        if self.calls == self.at:
            signal.raise_signal(signal.SIGTERM)
        return self.inner.prepare(indices, job=job, step=step)  # type: ignore[attr-defined]

    def update(self, batch: object, **kw: object) -> object:
        return self.inner.update(batch, **kw)  # type: ignore[attr-defined]


def _wrapped_setup(monkeypatch: pytest.MonkeyPatch, wrap: type, **kw: object) -> None:
    from openrelease import train

    original = train.STAGE_SETUPS["grpo"]

    def setup(
        params: PipelineParams, store: DataStore, pdir: Path, ctx: DistContext, stage: str
    ) -> object:
        inner = original(params, store, pdir, ctx, stage)
        return dataclasses.replace(inner, objective=wrap(inner.objective, **kw))

    monkeypatch.setitem(train.STAGE_SETUPS, "grpo", setup)


def test_grpo_sigterm_then_resume_is_exact(
    proj: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from openrelease import train

    twin = tmp_path / "twin"
    shutil.copytree(proj, twin)
    params = load_params(proj / "params.yaml")
    run_stage("grpo", params, project_dir=twin)

    original = train.STAGE_SETUPS["grpo"]
    _wrapped_setup(monkeypatch, _SigtermAtPrepare, at=4)
    stopped = run_stage("grpo", params, project_dir=proj)
    assert (stopped.interrupted, stopped.final_step) == (True, 3)
    assert _record(proj).status == "KILLED"
    monkeypatch.setitem(train.STAGE_SETUPS, "grpo", original)
    resumed = run_stage("grpo", params, project_dir=proj)
    assert (resumed.start_step, resumed.final_step, resumed.interrupted) == (3, 5, False)

    want = list_checkpoints(twin / "artifacts/grpo/checkpoints")
    got = list_checkpoints(proj / "artifacts/grpo/checkpoints")
    assert [m.checkpoint_digest for m in got] == [m.checkpoint_digest for m in want]

    def strip(rows: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]

    assert strip(_metrics(proj)) == strip(_metrics(twin))
    record = _record(proj)
    assert record.status == "FINISHED"
    assert [c.step for c in record.checkpoints] == [2, 4, 5]  # step 2 came from the first run


class _FailAt(_SigtermAtPrepare):
    def prepare(self, indices: list[int], *, job: TrainJob, step: int) -> object:
        if step == self.at:
            raise RuntimeError("simulated crash")
        return self.inner.prepare(indices, job=job, step=step)  # type: ignore[attr-defined]


def test_grpo_crash_marks_the_run_failed(proj: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    _wrapped_setup(monkeypatch, _FailAt, at=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage("grpo", load_params(proj / "params.yaml"), project_dir=proj)
    send_stage(proj, "grpo")
    record = _record(proj)
    assert record.status == "FAILED"
    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    assert client.get_run(str(record.run_id)).info.status == "FAILED"


# --------------------------------------------------------------------------- 2 ranks, torchrun


def _grpo_job(project: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return start_torchrun(project, ENTRY, "grpo", env=env)


@pytest.mark.slow
def test_two_rank_grpo_killed_and_resumed_matches(proj: Path, tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    shutil.copytree(proj, killed)
    kill_then_resume(_grpo_job, proj, killed, "grpo")

    rows = _metrics(proj)
    assert len(rows) == 5 and all(math.isfinite(r[k]) for r in rows for k in GRPO_METRICS)
    assert final_checkpoint(killed, "grpo")[1].checkpoint_digest == (
        final_checkpoint(proj, "grpo")[1].checkpoint_digest
    )
    for where in (proj, killed):
        record = _record(where)
        assert record.status == "FINISHED"
        assert record.environment["world_size"] == "2"
        assert [c.step for c in record.checkpoints] == [2, 4, 5]


def test_prompt_source_renders_and_left_pads(data_dir: Path) -> None:
    from transformers import AutoTokenizer

    from openrelease.train.grpo import PromptSource

    store = DataStore(data_dir)
    tok = AutoTokenizer.from_pretrained(str(store.tokenizer_dir))
    source = PromptSource(store.records("grpo"), tokenizer=tok, max_prompt_len=12)
    ids = source.prompt_ids(0)
    assert len(ids) <= 12 and str(tok.decode(list(ids))).endswith("<|assistant|>")
    full = PromptSource(store.records("grpo"), tokenizer=tok, max_prompt_len=200)
    assert str(tok.decode(list(full.prompt_ids(0)))).startswith("<|user|>")
    (mb,) = full.micro_batches([0, 1], micro_batch_size=2)
    assert mb.attention_mask is not None
    assert (mb.labels == -100).all()
    for row in range(2):
        n = int(mb.attention_mask[row].sum())
        assert mb.input_ids[row, -n:].tolist() == list(full.prompt_ids(row))
    assert source.answer(0) == store.records("grpo")[0]["answer"]


def test_grpo_needs_room_for_the_prompt(project: Path, tiny_params: PipelineParams) -> None:
    from openrelease.errors import ParamsError

    bad = tiny_params.model_copy(
        update={"grpo": tiny_params.grpo.model_copy(update={"seq_len": 8})}
    )
    with pytest.raises(ParamsError, match=r"must exceed grpo\.max_new_tokens"):
        run_stage("grpo", bad, project_dir=project)
