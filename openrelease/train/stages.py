"""The training stage kinds: what each trains on, and `run_stage`, which runs one on every rank.

A stage's setup (chosen by its kind) picks its batch source, objective and initial checkpoint
(params ``stages[].from``: an earlier stage's final one, scratch or a base model); `run_stage`
builds the `TrainJob`, records the run and hands it to the loop. Start one with `openrelease
launch <stage>` (the argv comes from train/launch.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from transformers import AutoTokenizer

from openrelease.data.store import DataStore
from openrelease.digest import sha256_json
from openrelease.errors import ParamsError
from openrelease.layout import STAGE_MANIFEST, Workspace
from openrelease.manifest import InputRecord, read_model
from openrelease.params import (
    DistillParams,
    DPOParams,
    GRPOParams,
    PipelineParams,
    StageKind,
    StageName,
    TrainStageParams,
    init_kind,
    load_params,
)
from openrelease.record.tracking import StageTracker
from openrelease.train import distributed
from openrelease.train.checkpoint import final_checkpoint
from openrelease.train.distill import (
    TEACHER_FILE,
    TRACES_FILE,
    TeacherRecord,
    distill_pairs,
    prepare_traces,
)
from openrelease.train.distributed import DistContext
from openrelease.train.dpo import DPOObjective, PairSource
from openrelease.train.grpo import GRPOObjective, PromptSource
from openrelease.train.job import BatchSource, Objective, TrainJob
from openrelease.train.loop import TrainReport, run_training
from openrelease.train.model import SpecialTokens
from openrelease.train.pretrain import PackedSource
from openrelease.train.sft import ChatSource, sft_pairs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSetup:
    """What distinguishes a stage: its samples, objective and the checkpoint it starts from."""

    source: BatchSource
    init_checkpoint: Path | None
    init_digest: str | None
    objective: Objective[Any] | None = None
    """None: next-token cross-entropy on ``source``."""
    inputs: tuple[InputRecord, ...] = ()
    """Stage-specific inputs for the provenance record (traces, reference model, ...)."""


def _rel(path: Path, project_dir: Path) -> str:
    return (
        path.relative_to(project_dir).as_posix() if path.is_relative_to(project_dir) else str(path)
    )


_T = TypeVar("_T", bound=TrainStageParams)
BaseModelLoader = Callable[[str, Path], tuple[Path, str, InputRecord]]
"""(``from`` value, project dir) -> (local model folder, its digest, its provenance input)."""
BASE_MODEL_LOADER: BaseModelLoader | None = None
"""Loads ``from: hf:ORG/NAME@REVISION`` or a local folder; set by the base-model feature."""


def _stage_init(
    params: PipelineParams, stage: StageName, project_dir: Path
) -> tuple[Path | None, str | None, tuple[InputRecord, ...]]:
    """The weights ``stage`` starts from (params ``stages[].from``): folder, digest, inputs."""
    source = params.spec(stage).from_
    match init_kind(source):
        case "scratch":
            return None, None, ()
        case "stage":
            folder, meta = final_checkpoint(project_dir, source)
            record = InputRecord(
                name=f"{source}-final",
                kind="checkpoint",
                path=_rel(folder, project_dir),
                digest=meta.checkpoint_digest,
            )
            return folder, meta.checkpoint_digest, (record,)
        case _:
            folder, digest, record = _base_model_loader(params, stage)(source, project_dir)
            return folder, digest, (record,)


def _base_model_loader(params: PipelineParams, stage: StageName) -> BaseModelLoader:
    if BASE_MODEL_LOADER is None:
        raise ParamsError(
            f"stage {stage} starts from {params.spec(stage).from_!r}, but this openrelease cannot "
            "load base models yet (`from: hf:ORG/NAME@REVISION` or a folder arrives with the "
            "base-model feature, issue 17); start it from an earlier stage or scratch."
        )
    return BASE_MODEL_LOADER


def _section(params: PipelineParams, stage: StageName, kind: type[_T]) -> _T:
    section = params.stage(stage)
    assert isinstance(section, kind), f"{stage} is not a {kind.__name__} section"
    return section


def _pretrain_setup(
    params: PipelineParams, store: DataStore, project_dir: Path, ctx: DistContext, stage: StageName
) -> StageSetup:
    folder, digest, inputs = _stage_init(params, stage, project_dir)
    return StageSetup(PackedSource(store), folder, digest, inputs=inputs)


def _sft_setup(
    params: PipelineParams, store: DataStore, project_dir: Path, ctx: DistContext, stage: StageName
) -> StageSetup:
    folder, digest, inputs = _stage_init(params, stage, project_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(store.tokenizer_dir))
    source = ChatSource(
        sft_pairs(store.records("sft")), tokenizer=tokenizer, seq_len=params.stage(stage).seq_len
    )
    return StageSetup(source, folder, digest, inputs=inputs)


def _dpo_setup(
    params: PipelineParams, store: DataStore, project_dir: Path, ctx: DistContext, stage: StageName
) -> StageSetup:
    p = _section(params, stage, DPOParams)
    folder, digest, init = _stage_init(params, stage, project_dir)
    assert folder is not None, "params refuse a dpo stage from scratch"
    pairs = store.records("dpo")
    if not pairs:
        raise ParamsError(
            f"the data has no preference pairs for {stage}; add data.imports with role dpo "
            "or synthetic problems (data.synthetic.num_problems)."
        )
    if p.reference is None:  # the policy's starting weights
        ref_folder, ref = folder, init[0]
    else:  # params check it is an earlier stage
        ref_folder, meta = final_checkpoint(project_dir, p.reference)
        ref = InputRecord(
            name=f"{p.reference}-final",
            kind="checkpoint",
            path=_rel(ref_folder, project_dir),
            digest=meta.checkpoint_digest,
        )
    reference = ref.model_copy(update={"name": "reference", "kind": "reference-checkpoint"})
    tokenizer = AutoTokenizer.from_pretrained(str(store.tokenizer_dir))
    source = PairSource(pairs, tokenizer=tokenizer, seq_len=p.seq_len)
    objective = DPOObjective(p, source=source, reference=ref_folder)
    return StageSetup(source, folder, digest, objective, (*init, reference))


def _distill_setup(
    params: PipelineParams, store: DataStore, project_dir: Path, ctx: DistContext, stage: StageName
) -> StageSetup:
    folder, digest, init = _stage_init(params, stage, project_dir)
    section = _section(params, stage, DistillParams)
    out_dir = Workspace(project_dir).stage_dir(stage)
    teacher = section.teacher
    # Rank 0 writes the traces (a model teacher generates them) while the others wait.
    distributed.run_on_main(
        ctx, lambda: prepare_traces(teacher, store=store, project_dir=project_dir, out_dir=out_dir)
    )
    record = read_model(out_dir / TEACHER_FILE, TeacherRecord)
    tokenizer = AutoTokenizer.from_pretrained(str(store.tokenizer_dir))
    source = ChatSource(distill_pairs(out_dir), tokenizer=tokenizer, seq_len=section.seq_len)
    inputs = (
        *init,
        InputRecord(
            name="teacher-traces",
            kind="traces",
            path=_rel(out_dir / TRACES_FILE, project_dir),
            digest=record.traces_sha256,
        ),
        InputRecord(
            name="teacher",
            kind=f"teacher-{record.kind}",
            path=record.path or _rel(store.data_dir, project_dir),
            digest=record.teacher_sha256,
        ),
    )
    return StageSetup(source, folder, digest, inputs=inputs)


def _grpo_setup(
    params: PipelineParams, store: DataStore, project_dir: Path, ctx: DistContext, stage: StageName
) -> StageSetup:
    p = _section(params, stage, GRPOParams)
    if p.seq_len <= p.max_new_tokens:
        raise ParamsError(
            f"{stage}.seq_len {p.seq_len} must exceed {stage}.max_new_tokens {p.max_new_tokens}: "
            "prompts get seq_len - max_new_tokens tokens."
        )
    folder, digest, init = _stage_init(params, stage, project_dir)
    assert folder is not None, "params refuse a grpo stage from scratch"
    tokenizer = AutoTokenizer.from_pretrained(str(store.tokenizer_dir))
    source = PromptSource(
        store.records("grpo"), tokenizer=tokenizer, max_prompt_len=p.seq_len - p.max_new_tokens
    )
    objective = GRPOObjective(p, source=source, tokenizer=tokenizer, reference=folder)
    reference = init[0].model_copy(update={"name": "reference", "kind": "reference-checkpoint"})
    return StageSetup(source, folder, digest, objective, (*init, reference))


SetupFn = Callable[[PipelineParams, DataStore, Path, DistContext, StageName], StageSetup]
STAGE_SETUPS: dict[StageKind, SetupFn] = {
    "pretrain": _pretrain_setup,
    "sft": _sft_setup,
    "dpo": _dpo_setup,
    "distill": _distill_setup,
    "grpo": _grpo_setup,
}
"""Stage kind -> batch source, objective and init checkpoint (a kind without one cannot run)."""


def stage_params_digest(params: PipelineParams, stage: StageName) -> str:
    """Digest of the params a stage's result depends on (seed, model, compute, its section)."""
    return sha256_json(
        {
            "seed": params.seed,
            "model": params.model.model_dump(mode="json"),
            "compute": params.compute.model_dump(mode="json"),
            stage: params.stage(stage).model_dump(mode="json"),
        }
    )


def _common_inputs(store: DataStore, project_dir: Path) -> list[InputRecord]:
    return [
        InputRecord(
            name="data-manifest",
            kind="data",
            path=_rel(store.data_dir / STAGE_MANIFEST, project_dir),
            digest=store.manifest.data_digest,
        ),
        InputRecord(
            name="tokenizer",
            kind="tokenizer",
            path=_rel(store.tokenizer_dir, project_dir),
            digest=store.manifest.tokenizer_sha256,
        ),
    ]


def _train_recorded(job: TrainJob, ctx: DistContext, tracker: StageTracker) -> TrainReport:
    """`run_training`, with the stage's run closed as finished, killed or failed."""
    try:
        report = run_training(job, ctx)
    except KeyboardInterrupt:
        _finish_quietly(tracker, "KILLED")
        raise
    except BaseException:
        _finish_quietly(tracker, "FAILED")
        raise
    tracker.finish(status="KILLED" if report.interrupted else "FINISHED")
    return report


def _finish_quietly(tracker: StageTracker, status: str) -> None:
    """Close the run while another error propagates; never hide that error (e.g. disk full)."""
    try:
        tracker.finish(status=status)
    except OSError as exc:
        logger.warning("could not write the run record (%s); `tracking sync` later", exc)


def run_stage(
    stage: StageName,
    params: PipelineParams,
    *,
    project_dir: Path,
    stop_at_step: int | None = None,
    record: bool = True,
) -> TrainReport:
    """Run (or resume) training stage ``stage``; call on every rank of the job.

    Rank 0 records the run (params, inputs, per-step metrics, every release checkpoint) with
    `openrelease.record.tracking.StageTracker`: MLflow through the journal, plus ``record.json``.

    Args:
        stage: The training stage.
        params: The pipeline params.
        project_dir: The workspace (holds artifacts/).
        stop_at_step: Return after this step, with the schedule of the full run (a replay).
        record: False writes only the stage's files (no MLflow run, no record.json).

    Returns:
        What the run did (``interrupted`` when a signal stopped it after saving a state).

    Raises:
        ParamsError: The stage has no trainer here, or the batch does not split over the ranks.
    """
    kind = params.spec(stage).kind
    if kind not in STAGE_SETUPS:
        raise ParamsError(
            f"stage {stage!r} has kind {kind}, which this openrelease cannot train yet; "
            f"kinds it trains: {', '.join(STAGE_SETUPS)}."
        )
    if init_kind(params.spec(stage).from_) in ("hf", "folder"):
        _base_model_loader(params, stage)  # fail before any process group or data is opened
    _, world_size, _ = distributed.env_world()
    distributed.check_world(params.stage(stage), name=stage, world_size=world_size)
    workspace = Workspace(project_dir)
    store = DataStore(workspace.data(params.data.out_dir))
    ctx = distributed.init_distributed(params.compute)
    log_filter = distributed.RankZeroFilter(ctx.rank)
    handlers = logging.getLogger().handlers
    for handler in handlers:
        handler.addFilter(log_filter)
    try:
        setup = STAGE_SETUPS[kind](params, store, project_dir, ctx, stage)
        tok = AutoTokenizer.from_pretrained(str(store.tokenizer_dir))
        job = TrainJob(
            stage=stage,
            params=params.stage(stage),
            model=params.model,
            compute=params.compute,
            seed=params.seed,
            project_dir=project_dir,
            source=setup.source,
            data_digest=store.manifest.data_digest,
            tokenizer_dir=store.tokenizer_dir,
            vocab_size=len(tok),
            special=SpecialTokens(tok.bos_token_id, tok.eos_token_id, tok.pad_token_id),
            params_digest=stage_params_digest(params, stage),
            init_checkpoint=setup.init_checkpoint,
            init_digest=setup.init_digest,
            objective=setup.objective,
            stop_at_step=stop_at_step,
        )
        if not record:
            return run_training(job, ctx)
        tracker = StageTracker(
            stage,
            params=params,
            project_dir=project_dir,
            out_dir=workspace.stage_dir(stage),
            enabled=ctx.is_main,
            world_size=ctx.world_size,
            num_threads=params.compute.num_threads,
        )
        tracker.start([*_common_inputs(store, project_dir), *setup.inputs])
        job = replace(job, recorder=tracker if ctx.is_main else None)
        return _train_recorded(job, ctx, tracker)
    finally:
        for handler in handlers:
            handler.removeFilter(log_filter)
        distributed.teardown()


def main_from_cli(stage: StageName, params_path: Path, project_dir: Path) -> TrainReport:
    """The `openrelease train <stage>` entry: load params, then `run_stage` on this rank."""
    params = load_params(params_path)
    return run_stage(stage, params, project_dir=project_dir)
