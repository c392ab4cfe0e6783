"""The one training loop every stage shares: batches, accumulation, AdamW, schedule, checkpoints.

Stages differ only in the `BatchSource` and `Objective` of their `TrainJob` (train/job.py; token
cross-entropy by default, GRPO in train/grpo.py); resume, signals, logging and the provenance
hooks live here.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict

from openrelease.data.order import global_batch, range_digest, rank_slice
from openrelease.errors import ArtifactError
from openrelease.layout import STATE_FILE, Workspace
from openrelease.manifest import CheckpointFacts, write_text_atomic
from openrelease.params import TrainStageParams
from openrelease.safeio import read_json_file
from openrelease.train import checkpoint as ckpt
from openrelease.train import distributed
from openrelease.train.adamw import PortableAdamW
from openrelease.train.job import Objective, StepOutcome, TrainJob
from openrelease.train.model import build_model, load_pretrained, save_model_config
from openrelease.train.objective import TokenObjective, all_reduce_sum
from openrelease.train.progress import ProgressReporter

logger = logging.getLogger(__name__)


class TrainReport(BaseModel):
    """What a stage run did."""

    model_config = ConfigDict(frozen=True)
    stage: str
    start_step: int
    final_step: int
    num_steps: int
    interrupted: bool
    final_loss: float | None
    tokens_seen: int
    world_size: int
    rank: int
    """The rank that made this report; only rank 0 should render it."""
    seconds: float
    manifest_path: str | None


@dataclass
class _Position:
    step: int = 0
    tokens_seen: int = 0
    parent_digest: str | None = None
    last_checkpoint_step: int = 0
    loss: float | None = None


def lr_at(step: int, params: TrainStageParams) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warm-up, then the schedule."""
    peak, floor = params.lr, params.lr * params.min_lr_ratio
    if step <= params.warmup_steps:
        return peak * step / params.warmup_steps
    if params.schedule == "constant":
        return peak
    if params.schedule == "wsd":
        decay_steps = max(1, math.ceil(params.decay_fraction * params.num_steps))
        decay_start = max(params.warmup_steps, params.num_steps - decay_steps)
        if step <= decay_start:
            return peak
        frac = (step - decay_start) / (params.num_steps - decay_start)
        return peak + (floor - peak) * frac
    frac = (step - params.warmup_steps) / (params.num_steps - params.warmup_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves a state and returns at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        logger.warning("received %s: saving a training state, then stopping", signum)
        self.requested = True

    @contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _build(
    job: TrainJob, ctx: distributed.DistContext
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    # Identical init on every rank: fully_shard shards each rank's full local copy.
    torch.manual_seed(job.seed)
    model: torch.nn.Module
    if job.base_model is not None and job.init_checkpoint is not None:
        model = load_pretrained(job.init_checkpoint, vocab_size=job.vocab_size, special=job.special)
    else:
        model = build_model(job.model, vocab_size=job.vocab_size, special=job.special)
    if job.init_checkpoint is not None and job.base_model is None:
        weights = ckpt.load_weights(job.init_checkpoint)
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise ArtifactError(
                f"{job.init_checkpoint} does not fit the model params ({str(exc)[:200]}); "
                "re-run the earlier stage with the same model section."
            ) from None
    model = distributed.shard_model(model, ctx, job.compute)
    lr, betas, decay = lr_at(1, job.params), job.params.betas, job.params.weight_decay
    optimizer: torch.optim.Optimizer
    if ctx.device.type == "cuda":
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=lr, betas=betas, weight_decay=decay, fused=True
        )
    else:  # torch's AdamW but for its MKL sqrt, whose bits depend on the CPU vendor
        optimizer = PortableAdamW(model.parameters(), lr=lr, betas=betas, weight_decay=decay)
    return model, optimizer


_IDENTITY = ("params_digest", "data_digest", "init_digest")


def _identity(job: TrainJob) -> dict[str, str | None]:
    """What a training state must share with this job to be resumed."""
    return {
        "params_digest": job.params_digest,
        "data_digest": job.data_digest,
        "init_digest": job.init_digest,
    }


def _resume(
    job: TrainJob,
    ctx: distributed.DistContext,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> _Position:
    workspace, stage = Workspace(job.project_dir), job.stage
    if ctx.is_main:
        ckpt.remove_partial(workspace.states(stage))
        ckpt.remove_partial(workspace.checkpoints(stage))
    dist.barrier()
    state_dir = ckpt.latest_state(workspace.states(stage))
    if state_dir is not None:
        saved = read_json_file(state_dir / STATE_FILE)
        if {k: saved.get(k) for k in _IDENTITY} != _identity(job):
            logger.warning(
                "%s was written with other params, data or initial weights; starting afresh",
                state_dir,
            )
            state_dir = None
    dist.barrier()  # every rank has read the state before the main rank may remove it
    if state_dir is None:
        if ctx.is_main:
            for path in (
                workspace.states(stage),
                workspace.checkpoints(stage),
                workspace.stage_manifest(stage),
                workspace.metrics(stage),
            ):
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        dist.barrier()
        torch.manual_seed(job.seed + 1000 + ctx.rank)
        return _Position(parent_digest=job.init_digest)
    info = ckpt.load_state(state_dir, model=model, optimizer=optimizer)
    if info["world_size"] != ctx.world_size or info["num_threads"] != job.compute.num_threads:
        logger.warning("resuming with another world size or thread count: not bit-exact")
    if ctx.is_main:
        _truncate_after(workspace, stage, info["step"])
    dist.barrier()
    logger.info("resumed %s from %s", job.stage, state_dir)
    return _Position(
        step=info["step"],
        tokens_seen=info["tokens_seen"],
        parent_digest=info["parent_digest"],
        last_checkpoint_step=info["last_checkpoint_step"],
        loss=info["loss"],
    )


def _truncate_after(workspace: Workspace, stage: str, step: int) -> None:
    """Drop checkpoints and metric lines past ``step``: the resumed run rewrites them."""
    for meta in ckpt.list_checkpoints(workspace.checkpoints(stage)):
        if meta.step > step:
            shutil.rmtree(workspace.checkpoint(stage, meta.step))
    metrics = workspace.metrics(stage)
    if metrics.is_file():
        keep = [ln for ln in metrics.read_text().splitlines() if json.loads(ln)["step"] <= step]
        # A new file, renamed into place: the old one may be a link into the DVC cache, and the
        # resumed run appends to this one.
        write_text_atomic(metrics, "".join(ln + "\n" for ln in keep))


def _data_digest(job: TrainJob, first: int, last: int) -> str:
    return range_digest(
        seed=job.seed,
        data_digest=job.data_digest,
        stage=job.stage,
        first_step=first,
        last_step=last,
        num_samples=job.source.num_samples,
        global_batch_size=job.params.global_batch_size,
    )


def _release(
    job: TrainJob, ctx: distributed.DistContext, model: torch.nn.Module, pos: _Position
) -> None:
    """Write the consolidated HF checkpoint of ``pos.step`` (gather on all, write on rank 0)."""
    state_dict = ckpt.gather_full_state_dict(model)
    config: Any = getattr(model, "config")  # noqa: B009 - set by transformers, untyped
    gbs = job.params.global_batch_size
    workspace = Workspace(job.project_dir)
    if ctx.is_main:
        meta = ckpt.write_release_checkpoint(
            workspace.checkpoints(job.stage),
            state_dict=state_dict,
            save_config=lambda folder: save_model_config(config, folder),
            tokenizer_dir=job.tokenizer_dir,
            info=CheckpointFacts(
                stage=job.stage,
                step=pos.step,
                tokens_seen=pos.tokens_seen,
                samples_seen=pos.step * gbs,
                sample_range=(pos.last_checkpoint_step * gbs, pos.step * gbs),
                data_digest=_data_digest(job, pos.last_checkpoint_step + 1, pos.step),
                loss=pos.loss,
                params_digest=job.params_digest,
                parent_digest=pos.parent_digest,
                base_model=job.base_model,
            ),
        )
        logger.info("checkpoint step %d: %s", pos.step, meta.checkpoint_digest[:19])
        if job.recorder is not None:
            job.recorder.log_checkpoint(meta, path=workspace.checkpoint(job.stage, pos.step))
    digest = [meta.checkpoint_digest if ctx.is_main else None]
    dist.broadcast_object_list(digest, src=0)
    pos.parent_digest, pos.last_checkpoint_step = digest[0], pos.step


def _save_state(
    job: TrainJob,
    ctx: distributed.DistContext,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    pos: _Position,
) -> ckpt.PendingState:
    info = {
        "stage": job.stage,
        "step": pos.step,
        "tokens_seen": pos.tokens_seen,
        "parent_digest": pos.parent_digest,
        "last_checkpoint_step": pos.last_checkpoint_step,
        "loss": pos.loss,
        **_identity(job),
        "world_size": ctx.world_size,
        "num_threads": job.compute.num_threads,
    }
    return ckpt.save_state(
        Workspace(job.project_dir).states(job.stage),
        step=pos.step,
        model=model,
        optimizer=optimizer,
        info=info,
        keep_last=job.params.keep_last_states,
        async_group=ctx.checkpoint_group,
    )


def run_training(job: TrainJob, ctx: distributed.DistContext) -> TrainReport:
    """Run (or resume) one stage to ``job.params.num_steps``; collective on every rank.

    With ``job.stop_at_step`` it returns after that step, having written what the full run
    writes up to there (checkpoints, states, metrics) but no stage manifest.

    Returns:
        The report; ``interrupted`` is true when SIGTERM/SIGINT stopped it after a state save.
    """
    p = job.params
    distributed.check_world(p, name=job.stage, world_size=ctx.world_size)
    objective: Objective[Any] = job.objective or TokenObjective()
    model, optimizer = _build(job, ctx)
    objective.start(job, ctx)
    pos = _resume(job, ctx, model, optimizer)
    start, started = pos.step, time.monotonic()
    workspace, stage = Workspace(job.project_dir), job.stage
    if ctx.is_main and job.recorder is not None:
        # A resumed run's record must still list the checkpoints written before the stop.
        for meta in ckpt.list_checkpoints(workspace.checkpoints(stage)):
            job.recorder.log_checkpoint(meta, path=workspace.checkpoint(stage, meta.step))
    state_every = p.state_every or p.checkpoint_every
    end = min(p.num_steps, job.stop_at_step or p.num_steps)
    pending: ckpt.PendingState | None = None
    interrupted = False
    reporter = ProgressReporter(job.stage, total=end, start=start, enabled=ctx.is_main)
    with _StopFlag().installed() as stop, reporter:
        while pos.step < end:
            step = pos.step + 1
            batch = global_batch(
                seed=job.seed,
                data_digest=job.data_digest,
                stage=job.stage,
                step=step,
                num_samples=job.source.num_samples,
                global_batch_size=p.global_batch_size,
            )
            mine = rank_slice(batch, rank=ctx.rank, world_size=ctx.world_size)
            prepared = objective.prepare(mine, job=job, step=step)
            (stops,) = all_reduce_sum([float(stop.requested)], ctx)
            if stops:
                interrupted = True
                break
            t0 = time.monotonic()
            lr = lr_at(step, p)
            for group in optimizer.param_groups:
                group["lr"] = lr
            out = objective.update(
                prepared, job=job, ctx=ctx, model=model, optimizer=optimizer, step=step
            )
            pos.step, pos.loss = step, out.loss
            pos.tokens_seen += out.tokens
            tps = out.tokens / max(time.monotonic() - t0, 1e-9)
            if ctx.is_main:
                _log_metrics(job, step, pos, lr=lr, tps=tps, outcome=out)
            reporter.update(step, loss=pos.loss, tokens_per_s=tps)
            last = step == p.num_steps
            if step % p.checkpoint_every == 0 or last:
                _release(job, ctx, model, pos)
            if step % state_every == 0 or last:
                if pending is not None:
                    pending.finish()
                pending = _save_state(job, ctx, model, optimizer, pos)
        if pending is not None:
            pending.finish()
    if interrupted and ckpt.latest_state(workspace.states(stage)) != workspace.state(
        stage, pos.step
    ):
        _save_state(job, ctx, model, optimizer, pos).finish()
    manifest_path = None
    if not interrupted and pos.step == p.num_steps:
        if ctx.is_main:
            ckpt.write_stage_manifest(job.project_dir, stage=stage)
        manifest_path = str(workspace.stage_manifest(stage))
    dist.barrier()
    return TrainReport(
        stage=job.stage,
        start_step=start,
        final_step=pos.step,
        num_steps=p.num_steps,
        interrupted=interrupted,
        final_loss=pos.loss,
        tokens_seen=pos.tokens_seen,
        world_size=ctx.world_size,
        rank=ctx.rank,
        seconds=round(time.monotonic() - started, 3),
        manifest_path=manifest_path,
    )


def _log_metrics(
    job: TrainJob, step: int, pos: _Position, *, lr: float, tps: float, outcome: StepOutcome
) -> None:
    row: dict[str, float] = {
        "loss": outcome.loss,
        "lr": lr,
        "grad_norm": outcome.grad_norm,
        "tokens": pos.tokens_seen,
        "tokens_per_s": round(tps, 1),
        **outcome.metrics,
    }
    path = Workspace(job.project_dir).metrics(job.stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **row}, sort_keys=True) + "\n")
    if job.recorder is not None:
        job.recorder.log_metrics(row, step=step)
