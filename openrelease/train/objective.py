"""What a training step optimises: the `Objective` protocol and its token cross-entropy default.

Also the batch types stages hand to it and the collective helpers objectives share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from openrelease.train import distributed

if TYPE_CHECKING:
    from openrelease.train.loop import TrainJob

IGNORE_INDEX = -100
BatchT = TypeVar("BatchT")


@dataclass(frozen=True)
class MicroBatch:
    """One forward pass on one rank; ``labels`` align with ``input_ids`` (shifted in the loss)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) input tokens."""
        if self.attention_mask is None:
            return self.input_ids.numel()
        return int(self.attention_mask.sum())

    @property
    def num_targets(self) -> int:
        """Tokens that carry loss (after the shift)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


class BatchSource(Protocol):
    """Where a stage's samples come from; sample ``i`` is a pure function of ``i``."""

    @property
    def num_samples(self) -> int:
        """Samples in the stage's dataset (the data order permutes these)."""
        ...

    def micro_batches(self, indices: list[int], *, micro_batch_size: int) -> list[MicroBatch]:
        """Turn this rank's sample indices of one step into micro-batches."""
        ...


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step did, summed or averaged over every rank."""

    loss: float
    tokens: int
    """Real tokens processed on all ranks (added to tokens seen)."""
    grad_norm: float
    metrics: dict[str, float] = field(default_factory=dict)
    """Stage-specific values for metrics.jsonl and MLflow (reward, kl, ...)."""


class Objective(Protocol[BatchT]):
    """How a stage turns one step's samples into parameter updates."""

    def start(self, job: TrainJob, ctx: distributed.DistContext) -> None:
        """Build what the objective needs besides the policy (before any state is restored)."""
        ...

    def prepare(self, indices: list[int], *, job: TrainJob, step: int) -> BatchT:
        """This rank's batch of step ``step`` from its sample indices; local, no collectives."""
        ...

    def update(
        self,
        batch: BatchT,
        *,
        job: TrainJob,
        ctx: distributed.DistContext,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        step: int,
    ) -> StepOutcome:
        """Compute gradients and step the optimizer (lr already set); collective."""
        ...


def all_reduce_sum(values: list[float], ctx: distributed.DistContext) -> list[float]:
    """Sum ``values`` over all ranks (float64, one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def _train_step(
    ctx: distributed.DistContext,
    model: torch.nn.Module,
    micro: list[MicroBatch],
    num_targets: float,
) -> float:
    """Forward/backward over the micro-batches; returns this rank's summed token loss."""
    loss_total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for i, mb in enumerate(micro):
        if isinstance(model, FSDPModule):
            # Accumulate locally; reduce-scatter gradients only after the last micro-batch.
            model.set_requires_gradient_sync(i == len(micro) - 1)
        mask = None if mb.attention_mask is None else mb.attention_mask.to(ctx.device)
        logits = model(input_ids=mb.input_ids.to(ctx.device), attention_mask=mask, use_cache=False)
        shift = logits.logits[:, :-1].float()
        loss_sum = F.cross_entropy(
            shift.reshape(-1, shift.size(-1)),
            mb.labels[:, 1:].reshape(-1).to(ctx.device),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        # FSDP averages gradients over ranks; x world_size makes it a sum over all target tokens.
        (loss_sum * (ctx.world_size / num_targets)).backward()  # type: ignore[no-untyped-call]
        loss_total += loss_sum.detach()
    return float(loss_total)  # one device sync per step, not per micro-batch


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, grad_clip: float
) -> float:
    """Clip the global gradient norm (0: no clipping), step and zero the gradients.

    Returns:
        The gradient norm before clipping.
    """
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


class TokenObjective:
    """Next-token cross-entropy on ``job.source``'s micro-batches (pretrain, sft, distill)."""

    def start(self, job: TrainJob, ctx: distributed.DistContext) -> None:
        """Nothing to build besides the policy."""

    def prepare(self, indices: list[int], *, job: TrainJob, step: int) -> list[MicroBatch]:
        """The source's micro-batches of this rank's samples."""
        return job.source.micro_batches(indices, micro_batch_size=job.params.micro_batch_size)

    def update(
        self,
        batch: list[MicroBatch],
        *,
        job: TrainJob,
        ctx: distributed.DistContext,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        step: int,
    ) -> StepOutcome:
        """One optimizer step on the mean loss over every target token of every rank."""
        counts = [sum(m.num_targets for m in batch), sum(m.num_tokens for m in batch)]
        targets, tokens = all_reduce_sum([float(c) for c in counts], ctx)
        local_loss = _train_step(ctx, model, batch, targets)
        grad_norm = optimizer_step(model, optimizer, grad_clip=job.params.grad_clip)
        (loss_sum,) = all_reduce_sum([local_loss], ctx)
        return StepOutcome(loss=loss_sum / targets, tokens=int(tokens), grad_norm=grad_norm)
