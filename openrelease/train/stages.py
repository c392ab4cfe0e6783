"""The training stage kinds: what each trains on, and `run_stage`, which runs one on every rank.

A stage's setup (chosen by its kind) picks its batch source, objective and initial checkpoint
(params ``stages[].from``: an earlier stage's final one, scratch, or an existing model on the
Hub or in a folder, train/base_model.py); `run_stage` builds the `TrainJob`, records the run
and hands it to the loop. Start one with `openrelease launch <stage>` (the argv comes from
train/launch.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from transformers import AutoTokenizer

from openrelease.data.order import check_algorithm
from openrelease.data.store import DataStore
from openrelease.digest import sha256_json
from openrelease.errors import ParamsError
from openrelease.layout import STAGE_MANIFEST, Workspace
from openrelease.manifest import InputRecord, PinnedSource, read_model
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
from openrelease.train.base_model import (
    cached_base_model,
    fetch_base_model,
    resolve_base_model,
)
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
    base_model: PinnedSource | None = None
    """The existing model the chain started from, if any."""


def _rel(path: Path, project_dir: Path) -> str:
    return (
        path.relative_to(project_dir).as_posix() if path.is_relative_to(project_dir) else str(path)
    )


_T = TypeVar("_T", bound=TrainStageParams)


@dataclass(frozen=True)
class StartPoint:
    """The weights a stage starts from: an earlier stage's checkpoint or a base model."""

    folder: Path
    digest: str
    """``checkpoint_digest`` of the earlier stage's final checkpoint, or the base model's digest
    (over its files)."""
    inputs: tuple[InputRecord, ...]
    base_model: PinnedSource | None
    """The existing model the chain started from (this stage's or an earlier one's)."""


def _base_input(pinned: PinnedSource) -> InputRecord:
    return InputRecord(name="base-model", kind="base-model", path=pinned.uri, digest=pinned.digest)


def _from_base_model(
    stage: StageName, params: PipelineParams, project_dir: Path, ctx: DistContext
) -> StartPoint:
    source, what = params.spec(stage).from_, f"stages: {stage} from"
    allow_floating = params.stage(stage).allow_floating_revision

    def fetch() -> tuple[Path, PinnedSource]:
        if (cached := cached_base_model(source, cache_dir=project_dir, what=what)) is not None:
            return cached
        ref = resolve_base_model(
            source, allow_floating_revision=allow_floating, project_dir=project_dir, what=what
        )
        return fetch_base_model(ref, cache_dir=project_dir, what=what)

    # Rank 0 resolves and downloads (every file checked), or takes the checked cache; the
    # others use what it found.
    folder, pinned = distributed.main_result(ctx, fetch)
    logger.info("%s starts from %s (%s)", stage, pinned.uri, pinned.digest[:19])
    return StartPoint(folder, pinned.digest, (_base_input(pinned),), pinned)


def _start_point(
    stage: StageName, params: PipelineParams, project_dir: Path, ctx: DistContext
) -> StartPoint | None:
    """Where ``stage`` starts (params ``stages[].from``); None: random weights from the seed."""
    source = params.spec(stage).from_
    match init_kind(source):
        case "scratch":
            return None
        case "hf" | "folder":
            return _from_base_model(stage, params, project_dir, ctx)
    folder, meta = final_checkpoint(project_dir, source)
    record = InputRecord(
        name=f"{source}-final",
        kind="checkpoint",
        path=_rel(folder, project_dir),
        digest=meta.checkpoint_digest,
    )
    base = (_base_input(meta.base_model),) if meta.base_model is not None else ()
    return StartPoint(folder, meta.checkpoint_digest, (record, *base), meta.base_model)


def _required(start: StartPoint | None, stage: StageName) -> StartPoint:
    assert start is not None, f"params refuse stage {stage} from scratch"
    return start


def _setup(
    source: BatchSource,
    start: StartPoint | None,
    objective: Objective[Any] | None = None,
    extra: tuple[InputRecord, ...] = (),
) -> StageSetup:
    """A `StageSetup` starting from ``start`` (None: from scratch), with its inputs first."""
    if start is None:
        return StageSetup(source, None, None, objective, extra)
    return StageSetup(
        source,
        start.folder,
        start.digest,
        objective,
        (*start.inputs, *extra),
        base_model=start.base_model,
    )


def _reference(start: StartPoint | InputRecord) -> InputRecord:
    """The frozen reference's input record: the start's (or an earlier stage's) checkpoint."""
    init = start.inputs[0] if isinstance(start, StartPoint) else start
    return init.model_copy(update={"name": "reference", "kind": f"reference-{init.kind}"})


def _section(params: PipelineParams, stage: StageName, kind: type[_T]) -> _T:
    section = params.stage(stage)
    assert isinstance(section, kind), f"{stage} is not a {kind.__name__} section"
    return section


def _pretrain_setup(
    params: PipelineParams, store: DataStore, project_dir: Path, ctx: DistContext, stage: StageName
) -> StageSetup:
    return _setup(PackedSource(store), _start_point(stage, params, project_dir, ctx))


def _sft_setup(
    params: PipelineParams, store: DataStore, project_dir: Path, ctx: DistContext, stage: StageName
) -> StageSetup:
    start = _start_point(stage, params, project_dir, ctx)
    tokenizer = AutoTokenizer.from_pretrained(str(store.tokenizer_dir))
    source = ChatSource(
        sft_pairs(store.records("sft")), tokenizer=tokenizer, seq_len=params.stage(stage).seq_len
    )
    return _setup(source, start)


def _dpo_setup(
    params: PipelineParams, store: DataStore, project_dir: Path, ctx: DistContext, stage: StageName
) -> StageSetup:
    p = _section(params, stage, DPOParams)
    start = _required(_start_point(stage, params, project_dir, ctx), stage)
    pairs = store.records("dpo")
    if not pairs:
        raise ParamsError(
            f"the data has no preference pairs for {stage}; add data.imports with role dpo "
            "or synthetic problems (data.synthetic.num_problems)."
        )
    if p.reference is None:  # the policy's starting weights
        ref_folder, reference = start.folder, _reference(start)
    else:  # params check it is an earlier stage
        ref_folder, meta = final_checkpoint(project_dir, p.reference)
        named = InputRecord(
            name=f"{p.reference}-final",
            kind="checkpoint",
            path=_rel(ref_folder, project_dir),
            digest=meta.checkpoint_digest,
        )
        reference = _reference(named)
    tokenizer = AutoTokenizer.from_pretrained(str(store.tokenizer_dir))
    source = PairSource(pairs, tokenizer=tokenizer, seq_len=p.seq_len)
    objective = DPOObjective(p, source=source, reference=ref_folder)
    return _setup(source, start, objective, (reference,))


def _distill_setup(
    params: PipelineParams, store: DataStore, project_dir: Path, ctx: DistContext, stage: StageName
) -> StageSetup:
    start = _required(_start_point(stage, params, project_dir, ctx), stage)
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
    extra = (
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
    return _setup(source, start, extra=extra)


def _grpo_setup(
    params: PipelineParams, store: DataStore, project_dir: Path, ctx: DistContext, stage: StageName
) -> StageSetup:
    p = _section(params, stage, GRPOParams)
    if p.seq_len <= p.max_new_tokens:
        raise ParamsError(
            f"{stage}.seq_len {p.seq_len} must exceed {stage}.max_new_tokens {p.max_new_tokens}: "
            "prompts get seq_len - max_new_tokens tokens."
        )
    start = _required(_start_point(stage, params, project_dir, ctx), stage)
    tokenizer = AutoTokenizer.from_pretrained(str(store.tokenizer_dir))
    source = PromptSource(
        store.records("grpo"), tokenizer=tokenizer, max_prompt_len=p.seq_len - p.max_new_tokens
    )
    objective = GRPOObjective(p, source=source, tokenizer=tokenizer, reference=start.folder)
    return _setup(source, start, objective, (_reference(start),))


SetupFn = Callable[[PipelineParams, DataStore, Path, DistContext, StageName], StageSetup]
STAGE_SETUPS: dict[StageKind, SetupFn] = {
    "pretrain": _pretrain_setup,
    "sft": _sft_setup,
    "dpo": _dpo_setup,
    "distill": _distill_setup,
    "grpo": _grpo_setup,
}
"""Stage kind -> batch source, objective and init checkpoint (one per StageKind)."""


def stage_params_digest(params: PipelineParams, stage: StageName) -> str:
    """Digest of the params a stage's result depends on (seed, model, compute, its section)."""
    return sha256_json(
        {
            "seed": params.seed,
            "model": params.model.model_dump(mode="json"),
            "compute": params.compute.model_dump(mode="json"),
            stage: params.stage(stage).digest_dump(),
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
        ParamsError: The stage is not in params, or the batch does not split over the ranks.
    """
    kind = params.spec(stage).kind  # every StageKind has a setup (STAGE_SETUPS)
    _, world_size, _ = distributed.env_world()
    distributed.check_world(params.stage(stage), name=stage, world_size=world_size)
    workspace = Workspace(project_dir)
    store = DataStore(workspace.data(params.data.out_dir))
    check_algorithm(store.manifest.order_algorithm, where=str(store.data_dir / STAGE_MANIFEST))
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
            base_model=setup.base_model,
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
