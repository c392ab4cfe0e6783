"""The dpo stage: preference pairs as batches, the DPO/IPO loss, and the update with a reference.

Each sample is a (prompt, chosen, rejected) pair; a micro-batch holds ``m`` pairs as ``2m``
chat-formatted rows (the chosen responses, then the rejected ones) with the loss on the response
tokens. Per step the frozen, sharded reference scores the whole batch once under ``no_grad``,
then the policy takes one optimizer step on the mean pair loss over every rank:

- ``sigmoid`` (DPO, Rafailov et al. 2023): ``-(1 - ls) log s(b z) - ls log s(-b z)`` with
  ``z = (pi_c - ref_c) - (pi_r - ref_r)`` on summed log-probs and ``ls`` the label smoothing
  (conservative DPO: the expected loss when a share ``ls`` of the labels is flipped);
- ``ipo`` (Azar et al. 2023): ``(z' - 1 / (2 b))^2``, ``z'`` the same difference with each
  log-ratio divided by its response's token count.

Rewards (``b x (pi - ref)``), margins and accuracy use the summed log-probs. These are TRL
1.16's `DPOTrainer` definitions; tests/test_dpo.py checks them against TRL itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from transformers import PreTrainedTokenizerBase

from openrelease.errors import ArtifactError
from openrelease.params import DPOParams
from openrelease.train import checkpoint as ckpt
from openrelease.train import distributed
from openrelease.train.job import IGNORE_INDEX, MicroBatch, StepOutcome, TrainJob
from openrelease.train.model import build_model
from openrelease.train.objective import all_reduce_sum, optimizer_step
from openrelease.train.sft import ChatSource

PAIR_FIELDS = ("prompt", "chosen", "rejected")


class PairSource:
    """Preference pairs; sample ``i`` is pair ``i``, as two chat rows (see `ChatSource`)."""

    def __init__(
        self,
        records: Sequence[dict[str, str]],
        *,
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
    ) -> None:
        rows: list[tuple[str, str]] = []
        for r in records:
            rows += [(r["prompt"], r["chosen"]), (r["prompt"], r["rejected"])]
        self.records = records
        self.chat = ChatSource(rows, tokenizer=tokenizer, seq_len=seq_len)

    @property
    def num_samples(self) -> int:
        """Preference pairs."""
        return len(self.records)

    def micro_batches(self, indices: list[int], *, micro_batch_size: int) -> list[MicroBatch]:
        """``micro_batch_size`` pairs per micro-batch: rows ``[chosen..., rejected...]``."""
        out = []
        for start in range(0, len(indices), micro_batch_size):
            chunk = indices[start : start + micro_batch_size]
            rows = [2 * i for i in chunk] + [2 * i + 1 for i in chunk]
            out += self.chat.micro_batches(rows, micro_batch_size=len(rows))
        return out


def sequence_logprobs(
    model: torch.nn.Module, batch: MicroBatch, *, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's target tokens under ``model``, and their count.

    Returns:
        ``([rows] float32 log-probs, [rows] token counts)``.
    """
    mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
    logits = model(input_ids=batch.input_ids.to(device), attention_mask=mask, use_cache=False)
    shifted = logits.logits[:, :-1].float()
    labels = batch.labels[:, 1:].to(device)
    targets = labels != IGNORE_INDEX
    token_logp = torch.gather(
        F.log_softmax(shifted, dim=-1), 2, labels.clamp(min=0).unsqueeze(2)
    ).squeeze(2)
    return (token_logp * targets).sum(dim=1), targets.sum(dim=1)


@dataclass(frozen=True)
class PairTerms:
    """Per pair: the loss to minimise and the implicit rewards ``beta x (pi - ref)``."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> PairTerms:
    """The DPO (sigmoid) or IPO loss of each pair from summed sequence log-probs.

    Args:
        policy_chosen: Policy log-probs of the chosen responses, ``[pairs]``.
        policy_rejected: Policy log-probs of the rejected responses.
        ref_chosen: Reference log-probs of the chosen responses.
        ref_rejected: Reference log-probs of the rejected responses.
        beta: The DPO temperature (IPO's tau).
        loss_type: ``sigmoid`` or ``ipo``.
        label_smoothing: sigmoid only: the assumed share of flipped labels (cDPO).
        chosen_tokens: Response token counts; IPO divides each log-ratio by them.
        rejected_tokens: Response token counts of the rejected responses.

    Returns:
        The per-pair losses and rewards (rewards on summed log-probs, as TRL logs them).
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)
        losses = -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the response token counts")
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(
            min=1
        )
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; use sigmoid or ipo")
    return PairTerms(
        losses=losses,
        chosen_rewards=beta * chosen_ratio.detach(),
        rejected_rewards=beta * rejected_ratio.detach(),
    )


def load_frozen(job: TrainJob, ctx: distributed.DistContext, folder: Path) -> torch.nn.Module:
    """The release checkpoint ``folder`` as a frozen model, sharded like the policy, in eval mode.

    Raises:
        ArtifactError: The checkpoint does not fit the model params.
    """
    ref: torch.nn.Module = build_model(job.model, vocab_size=job.vocab_size, special=job.special)
    try:
        ref.load_state_dict(ckpt.load_weights(folder), strict=True)
    except RuntimeError as exc:
        raise ArtifactError(
            f"{folder} does not fit the model params ({str(exc)[:200]}); "
            "re-run the stage that wrote it with the same model section."
        ) from None
    ref.requires_grad_(False)
    compute = job.compute.model_copy(update={"activation_checkpointing": False})
    return distributed.shard_model(ref, ctx, compute).eval()


class DPOObjective:
    """The DPO/IPO update on `PairSource` batches; holds the frozen, sharded reference."""

    def __init__(self, params: DPOParams, *, source: PairSource, reference: Path) -> None:
        self.params = params
        self.source = source
        self.reference_dir = reference
        self.reference: torch.nn.Module | None = None

    def start(self, job: TrainJob, ctx: distributed.DistContext) -> None:
        """Build the frozen reference model."""
        self.reference = load_frozen(job, ctx, self.reference_dir)

    def prepare(self, indices: list[int], *, job: TrainJob, step: int) -> list[MicroBatch]:
        """This rank's pairs of step ``step`` as micro-batches."""
        return self.source.micro_batches(indices, micro_batch_size=self.params.micro_batch_size)

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
        """Reference log-probs once (no grad), then one optimizer step on the mean pair loss."""
        assert self.reference is not None, "start() builds the reference model"
        p, device = self.params, ctx.device
        with torch.no_grad():
            ref = [sequence_logprobs(self.reference, mb, device=device)[0] for mb in batch]
        distributed.reshard(self.reference)  # no backward frees its root and last layer
        # loss, chosen reward, rejected reward, correct, chosen logp, rejected logp, pairs
        sums = torch.zeros(7, dtype=torch.float64, device=device)
        for i, mb in enumerate(batch):
            if isinstance(model, FSDPModule):
                model.set_requires_gradient_sync(i == len(batch) - 1)
            logp, counts = sequence_logprobs(model, mb, device=device)
            n = logp.size(0) // 2
            terms = preference_loss(
                logp[:n],
                logp[n:],
                ref[i][:n],
                ref[i][n:],
                beta=p.beta,
                loss_type=p.loss_type,
                label_smoothing=p.label_smoothing,
                chosen_tokens=counts[:n],
                rejected_tokens=counts[n:],
            )
            loss_sum = terms.losses.sum()
            # FSDP averages gradients over ranks; x world_size: a mean over all pairs.
            (loss_sum * (ctx.world_size / p.global_batch_size)).backward()  # type: ignore[no-untyped-call]
            with torch.no_grad():
                sums += torch.stack(
                    [
                        loss_sum.detach(),
                        terms.chosen_rewards.sum(),
                        terms.rejected_rewards.sum(),
                        (terms.chosen_rewards > terms.rejected_rewards).sum(),
                        logp[:n].detach().sum(),
                        logp[n:].detach().sum(),
                        torch.tensor(n, device=device),
                    ]
                ).double()
        grad_norm = optimizer_step(model, optimizer, grad_clip=p.grad_clip)
        local_tokens = float(sum(mb.num_tokens for mb in batch))
        stats = all_reduce_sum([*sums.tolist(), local_tokens], ctx)
        loss, chosen, rejected, correct, logp_c, logp_r, pairs, tokens = stats
        return StepOutcome(
            loss=loss / pairs,
            tokens=int(tokens),
            grad_norm=grad_norm,
            metrics={
                "reward_margin": (chosen - rejected) / pairs,
                "preference_accuracy": correct / pairs,
                "reward_chosen": chosen / pairs,
                "reward_rejected": rejected / pairs,
                "logp_chosen": logp_c / pairs,
                "logp_rejected": logp_r / pairs,
            },
        )
