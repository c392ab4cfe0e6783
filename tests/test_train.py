"""The trainer: schedule, batch sources, fail-fast checks, and real FSDP2 runs (1 and 2 ranks)."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torchrun_jobs import finish_job, kill_tree, start_torchrun

from openrelease.data.store import DataStore
from openrelease.errors import ParamsError
from openrelease.manifest import StageManifest, read_model
from openrelease.params import PipelineParams, TrainStageParams, load_params
from openrelease.train import main_from_cli, run_stage
from openrelease.train.checkpoint import final_checkpoint, list_checkpoints
from openrelease.train.distributed import DistContext
from openrelease.train.job import IGNORE_INDEX
from openrelease.train.loop import lr_at
from openrelease.train.sft import ChatSource

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


def _stage(**kw: object) -> TrainStageParams:
    base: dict[str, object] = {
        "num_steps": 100,
        "global_batch_size": 8,
        "micro_batch_size": 4,
        "seq_len": 64,
        "lr": 1e-3,
        "min_lr_ratio": 0.1,
        "warmup_steps": 10,
        "checkpoint_every": 10,
    }
    return TrainStageParams.model_validate({**base, **kw})


def test_lr_schedules() -> None:
    cos = _stage(schedule="cosine")
    assert lr_at(5, cos) == pytest.approx(5e-4)
    assert lr_at(10, cos) == pytest.approx(1e-3)
    assert lr_at(55, cos) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(100, cos) == pytest.approx(1e-4)
    wsd = _stage(schedule="wsd", decay_fraction=0.2)
    assert lr_at(80, wsd) == pytest.approx(1e-3)
    assert lr_at(90, wsd) == pytest.approx(1e-3 - 0.9e-3 * 0.5)
    assert lr_at(100, wsd) == pytest.approx(1e-4)
    assert lr_at(70, _stage(schedule="constant")) == pytest.approx(1e-3)


def test_chat_source_masks_all_but_the_reply(data_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(DataStore(data_dir).tokenizer_dir))
    pairs = [("What is 2 + 3?", "5"), ("A much longer question about 17 + 25?", "42")]
    source = ChatSource(pairs, tokenizer=tok, seq_len=96)
    (mb,) = source.micro_batches([0, 1], micro_batch_size=2)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": pairs[1][0]}, {"role": "assistant", "content": "42"}],
        tokenize=False,
    )
    assert mb.input_ids[1].tolist() == tok.encode(rendered, add_special_tokens=False)
    for row in range(2):
        keep = mb.labels[row] != IGNORE_INDEX
        assert tok.decode(mb.labels[row][keep]) == pairs[row][1] + "<|eos|>"
    assert mb.attention_mask is not None
    assert mb.attention_mask[0].sum() < mb.attention_mask[1].sum()  # row 0 is right-padded
    assert (mb.input_ids[0][mb.attention_mask[0] == 0] == tok.pad_token_id).all()


def test_batch_not_divisible_by_world_fails_fast(
    project: Path, tiny_params: PipelineParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ParamsError, match=r"global_batch_size 8 must be a multiple of .* 4 x 3"):
        run_stage("pretrain", tiny_params, project_dir=project)
    assert not (project / "artifacts" / "pretrain").exists()


def _metrics(project: Path, stage: str) -> list[dict[str, float]]:
    lines = (project / "artifacts" / stage / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _final_digest(project: Path, stage: str = "pretrain") -> str:
    return final_checkpoint(project, stage)[1].checkpoint_digest


@pytest.mark.slow
def test_one_process_pretrain_then_sft(project: Path) -> None:
    report = main_from_cli("pretrain", project / "params.yaml", project)
    assert (report.final_step, report.interrupted, report.world_size) == (8, False, 1)
    losses = [row["loss"] for row in _metrics(project, "pretrain")]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.2
    manifest = read_model(project / "artifacts/pretrain/manifest.json", StageManifest)
    assert [c.step for c in manifest.checkpoints] == [4, 8]
    assert manifest.checkpoints[0].parent_digest is None
    assert manifest.checkpoints[1].parent_digest == manifest.checkpoints[0].checkpoint_digest
    assert manifest.checkpoints[1].sample_range == (32, 64)
    names = {f.path for f in manifest.checkpoints[1].files}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    assert "tokenizer.json" in names

    sft = main_from_cli("sft", project / "params.yaml", project)
    assert sft.final_step == 4
    sft_manifest = read_model(project / "artifacts/sft/manifest.json", StageManifest)
    assert sft_manifest.checkpoints[0].parent_digest == manifest.checkpoints[1].checkpoint_digest
    sft_losses = [row["loss"] for row in _metrics(project, "sft")]
    assert sft_losses[-1] < sft_losses[0]
    # The rerun finds the final state and does no work, leaving the same checkpoints.
    again = main_from_cli("sft", project / "params.yaml", project)
    assert (again.start_step, again.final_step) == (4, 4)
    assert _final_digest(project, "sft") == sft_manifest.checkpoints[-1].checkpoint_digest


class _SigtermAt:
    """Wrap a batch source so the process receives SIGTERM while preparing step ``step``."""

    def __init__(self, inner: object, step: int, global_batch_size: int) -> None:
        self.inner, self.calls, self.step = inner, 0, step

    @property
    def num_samples(self) -> int:
        return self.inner.num_samples  # type: ignore[attr-defined, no-any-return]

    def micro_batches(self, indices: list[int], *, micro_batch_size: int) -> list[object]:
        self.calls += 1
        if self.calls == self.step:
            signal.raise_signal(signal.SIGTERM)
        return self.inner.micro_batches(indices, micro_batch_size=micro_batch_size)  # type: ignore[attr-defined, no-any-return]


@pytest.mark.slow
def test_sigterm_saves_state_and_resume_is_exact(
    project: Path, tiny_params: PipelineParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    from openrelease import train

    reference = main_from_cli("pretrain", project / "params.yaml", project)
    assert not reference.interrupted
    want = _final_digest(project)
    shutil.rmtree(project / "artifacts" / "pretrain")

    original = train.STAGE_SETUPS["pretrain"]

    def interrupted_setup(
        params: PipelineParams, store: DataStore, pdir: Path, ctx: DistContext, stage: str
    ) -> object:
        setup = original(params, store, pdir, ctx, stage)
        return train.StageSetup(_SigtermAt(setup.source, 6, 8), None, None)  # type: ignore[arg-type]

    monkeypatch.setitem(train.STAGE_SETUPS, "pretrain", interrupted_setup)
    stopped = run_stage("pretrain", tiny_params, project_dir=project)
    assert (stopped.interrupted, stopped.final_step) == (True, 5)
    assert (project / "artifacts/pretrain/states/step-5/state.json").is_file()
    assert not (project / "artifacts/pretrain/manifest.json").exists()
    monkeypatch.setitem(train.STAGE_SETUPS, "pretrain", original)
    resumed = run_stage("pretrain", tiny_params, project_dir=project)
    assert (resumed.start_step, resumed.final_step, resumed.interrupted) == (5, 8, False)
    assert _final_digest(project) == want
    assert [row["step"] for row in _metrics(project, "pretrain")] == list(range(1, 9))


# --------------------------------------------------------------------------- 2 ranks, torchrun


def _copy_project(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("artifacts"))
    shutil.copytree(src / "artifacts" / "data", dst / "artifacts" / "data")
    return dst


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_two_rank_fsdp_runs_are_exact_and_resumable(project: Path, tmp_path: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pretrain"]["state_every"] = 2
    params["pretrain"]["keep_last_states"] = 4
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    twin = _copy_project(project, tmp_path / "twin")
    killed = _copy_project(project, tmp_path / "killed")

    runs = [start_torchrun(project, ENTRY, "pretrain"), start_torchrun(twin, ENTRY, "pretrain")]
    for proc, where in zip(runs, (project, twin), strict=True):
        finish_job(proc, where)
    losses = [row["loss"] for row in _metrics(project, "pretrain")]
    assert losses[-1] < losses[0] - 0.2
    metas = list_checkpoints(project / "artifacts/pretrain/checkpoints")
    twin_metas = list_checkpoints(twin / "artifacts/pretrain/checkpoints")
    assert [m.checkpoint_digest for m in metas] == [m.checkpoint_digest for m in twin_metas]
    assert [m.files for m in metas] == [m.files for m in twin_metas]

    kill_step = random.Random().randint(2, 7)
    proc = start_torchrun(killed, ENTRY, "pretrain")
    metrics = killed / "artifacts/pretrain/metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_step:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    kill_tree(proc)
    assert not (killed / "artifacts/pretrain/manifest.json").exists()
    finish_job(start_torchrun(killed, ENTRY, "pretrain"), killed)
    assert _final_digest(killed) == _final_digest(project), f"killed at step {kill_step}"
    _check_logits_match_trainer(project, load_params(project / "params.yaml"))


def _check_logits_match_trainer(project: Path, params: PipelineParams) -> None:
    """The step-4 HF checkpoint gives the same logits as the trainer's step-4 training state."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    from openrelease.train.model import build_model

    folder = project / "artifacts/pretrain/checkpoints/step-4"
    hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    trainer = build_model(params.model, vocab_size=hf.config.vocab_size).eval()
    state = {"model": trainer.state_dict()}
    dcp.load(state, checkpoint_id=str(project / "artifacts/pretrain/states/step-4"), no_dist=True)
    trainer.load_state_dict(state["model"])
    row = DataStore(project / "artifacts/data").pretrain_sequence(0)
    ids = torch.tensor(row.tolist())[None]
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, trainer(ids).logits)


def test_launch_commands() -> None:
    from openrelease.params import ComputeParams
    from openrelease.train.launch import launch_command

    one = launch_command(ComputeParams(launcher="python"), stage="sft")
    assert one == ["python", "-m", "openrelease", "train", "sft", "--params", "params.yaml"]
    local = launch_command(ComputeParams(nproc_per_node=8), stage="pretrain")
    assert local[:6] == ["torchrun", "--nnodes", "1", "--nproc-per-node", "8", "--standalone"]
    multi = launch_command(
        ComputeParams(nproc_per_node=8, nnodes=4, rdzv_endpoint="node0:29500"), stage="pretrain"
    )
    assert multi[5:9] == ["--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29500"]
    assert "--standalone" not in multi
    slurm = launch_command(
        ComputeParams(launcher="srun", nproc_per_node=8, nnodes=2, rdzv_endpoint="n0:29500"),
        stage="sft",
        params_path="pipelines/small.yaml",
    )
    assert slurm[:5] == ["srun", "--nodes", "2", "--ntasks-per-node", "8"]
    assert slurm[-2:] == ["--params", "pipelines/small.yaml"]

    # resolve=True: what `openrelease launch` runs (this interpreter; srun nodes find python).
    here = launch_command(ComputeParams(launcher="python"), stage="sft", resolve=True)
    assert here == [sys.executable, *one[1:]]
    here = launch_command(ComputeParams(nproc_per_node=8), stage="pretrain", resolve=True)
    assert here == [sys.executable, "-m", "torch.distributed.run", *local[1:]]
    srun = ComputeParams(launcher="srun", nproc_per_node=8, nnodes=2, rdzv_endpoint="n0:29500")
    assert launch_command(srun, stage="sft", resolve=True) == launch_command(srun, stage="sft")


def test_replay_worker_argv_comes_from_the_launch_builder(tmp_path: Path) -> None:
    from openrelease.params import ComputeParams
    from openrelease.reproduce.replay import WORKER, main, worker_entry
    from openrelease.train.launch import launcher_argv

    entry = worker_entry("pretrain", tmp_path, stop_at_step=8, report=tmp_path / "r.json")
    assert entry == ["-m", WORKER, "pretrain", str(tmp_path), "8", str(tmp_path / "r.json")]
    argv = launcher_argv(ComputeParams(launcher="torchrun", nproc_per_node=2), entry, resolve=True)
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert argv[-len(entry) :] == entry and "--standalone" in argv
    with pytest.raises(SystemExit):
        main(["pretrain", str(tmp_path), "eight", "r.json"])  # argparse checks the step
    from project_paths import TEST_PARAMS

    from openrelease.errors import ParamsError

    shutil.copy(TEST_PARAMS, tmp_path / "params.yaml")
    with pytest.raises(ParamsError, match="'pre-train' is not a training stage"):
        main(["pre-train", str(tmp_path), "8", "r.json"])  # the workspace params name them


@pytest.mark.slow
def test_throughput_bench_cpu_smoke() -> None:
    bench = Path(__file__).parent.parent / "bench" / "train_throughput.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--smoke"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ours"]["tokens_per_s"] > 0
    assert result["plain_eager"]["tokens_per_s"] > 0
    assert result["ratio_vs_best_plain"] == pytest.approx(
        result["ours"]["tokens_per_s"] / result["plain_eager"]["tokens_per_s"], rel=1e-3
    )
