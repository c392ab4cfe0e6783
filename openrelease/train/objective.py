"""The token cross-entropy objective (pretrain, sft, distill) and the step helpers objectives share.

The `Objective` protocol it implements, and the batch types, live in train/job.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from openrelease.train import distributed
from openrelease.train.job import IGNORE_INDEX, MicroBatch, StepOutcome, TrainJob


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
