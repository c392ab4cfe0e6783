"""The GRPO stage: prompts in data order, rollouts from the sharded policy, and the update.

Per step, each rank takes its prompts of the global batch, samples ``group_size`` rollouts per
prompt (seeded by seed, step and rank), scores them with the verifiers in ``grpo.rewards``,
normalises rewards within each group, and takes ``ppo_epochs`` optimizer steps on the clipped
objective plus ``kl_coef`` x k3 KL to the frozen reference (the distill checkpoint), averaged
over every response token of every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from transformers import PreTrainedTokenizerBase

from openrelease.errors import ArtifactError
from openrelease.params import GRPOParams
from openrelease.train import checkpoint as ckpt
from openrelease.train import distributed
from openrelease.train.job import IGNORE_INDEX, MicroBatch, StepOutcome, TrainJob
from openrelease.train.model import build_model, load_pretrained
from openrelease.train.objective import all_reduce_sum, optimizer_step
from openrelease.train.rl import (
    Rollouts,
    clipped_objective,
    correctness_reward,
    format_reward,
    group_advantages,
    k3_kl,
    response_logprobs,
    rollout_seed,
    sample_rollouts,
    total_reward,
)
from openrelease.train.sft import ASSISTANT, USER


def _token_id(tokenizer: PreTrainedTokenizerBase, name: str) -> int:
    value = getattr(tokenizer, name)
    if not isinstance(value, int):
        raise ArtifactError(f"the tokenizer has no {name}; re-run `dvc repro data`.")
    return value


class PromptSource:
    """GRPO prompts rendered as ``<|user|>{prompt}<|assistant|>``, with their reference answers.

    Prompts longer than ``max_prompt_len`` tokens keep their last tokens (the question's end
    and the assistant marker).
    """

    def __init__(
        self,
        records: Sequence[dict[str, str]],
        *,
        tokenizer: PreTrainedTokenizerBase,
        max_prompt_len: int,
    ) -> None:
        self.records = records
        self.tokenizer = tokenizer
        self.max_prompt_len = max_prompt_len
        self.pad_id = _token_id(tokenizer, "pad_token_id")
        self.prompt_ids = lru_cache(maxsize=65536)(self._encode)

    @property
    def num_samples(self) -> int:
        """Prompts in the data stage's grpo dataset."""
        return len(self.records)

    def _encode(self, index: int) -> tuple[int, ...]:
        text = f"{USER}{self.records[index]['prompt']}{ASSISTANT}"
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return tuple(ids[-self.max_prompt_len :])

    def answer(self, index: int) -> str:
        """The verifiable reference answer of prompt ``index``."""
        return str(self.records[index]["answer"])

    def micro_batches(self, indices: list[int], *, micro_batch_size: int) -> list[MicroBatch]:
        """Left-padded prompts (what generation starts from); no token carries a loss."""
        out = []
        for start in range(0, len(indices), micro_batch_size):
            rows = [self.prompt_ids(i) for i in indices[start : start + micro_batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, width - len(row) :] = torch.tensor(row)
                mask[r, width - len(row) :] = 1
            labels = torch.full_like(ids, IGNORE_INDEX)
            out.append(MicroBatch(input_ids=ids, labels=labels, attention_mask=mask))
        return out


@dataclass(frozen=True)
class PromptBatch:
    """One rank's prompts of one step."""

    prompts: list[list[int]]
    answers: list[str]


class GRPOObjective:
    """The GRPO update; holds the frozen, sharded reference model."""

    def __init__(
        self,
        params: GRPOParams,
        *,
        source: PromptSource,
        tokenizer: PreTrainedTokenizerBase,
        reference: Path,
    ) -> None:
        self.params = params
        self.source = source
        self.tokenizer = tokenizer
        self.reference_dir = reference
        self.eos_id = _token_id(tokenizer, "eos_token_id")
        self.weights = {str(name): w for name, w in params.rewards.items()}
        self.reference: torch.nn.Module | None = None

    def start(self, job: TrainJob, ctx: distributed.DistContext) -> None:
        """Build the reference model from the distill checkpoint, sharded like the policy."""
        ref: torch.nn.Module
        if job.base_model is not None:
            ref = load_pretrained(
                self.reference_dir, vocab_size=job.vocab_size, special=job.special
            )
        else:
            ref = build_model(job.model, vocab_size=job.vocab_size, special=job.special)
            try:
                ref.load_state_dict(ckpt.load_weights(self.reference_dir), strict=True)
            except RuntimeError as exc:
                raise ArtifactError(
                    f"{self.reference_dir} does not fit the model params ({str(exc)[:200]}); "
                    "re-run the distill stage with the same model section."
                ) from None
        ref.requires_grad_(False)
        compute = job.compute.model_copy(update={"activation_checkpointing": False})
        self.reference = distributed.shard_model(ref, ctx, compute).eval()

    def prepare(self, indices: list[int], *, job: TrainJob, step: int) -> PromptBatch:
        """This rank's prompts (token ids) and answers."""
        return PromptBatch(
            prompts=[list(self.source.prompt_ids(i)) for i in indices],
            answers=[self.source.answer(i) for i in indices],
        )

    def _score(self, rollouts: Rollouts, answers: list[str]) -> torch.Tensor:
        """[rows, 3]: total reward, correctness and format of each decoded response."""
        responses = rollouts.sequences[:, rollouts.prompt_len :].tolist()
        lengths = rollouts.response_mask.sum(dim=1).tolist()
        scores = []
        for row, (ids, n) in enumerate(zip(responses, lengths, strict=True)):
            kept = ids[: n - 1] if ids[n - 1] == self.eos_id else ids[:n]
            text = self.tokenizer.decode(kept, skip_special_tokens=False)
            assert isinstance(text, str), "one sequence decodes to one string"
            answer = answers[row // self.params.group_size]
            scores.append(
                [
                    total_reward(text, answer, n, self.weights),
                    correctness_reward(text, answer, n),
                    format_reward(text, answer, n),
                ]
            )
        return torch.tensor(scores, dtype=torch.float64)

    def update(
        self,
        batch: PromptBatch,
        *,
        job: TrainJob,
        ctx: distributed.DistContext,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        step: int,
    ) -> StepOutcome:
        """Roll out, score, then ``ppo_epochs`` optimizer steps on this batch of rollouts."""
        assert self.reference is not None, "start() builds the reference model"
        p = self.params
        model.eval()  # no dropout while sampling
        rollouts = sample_rollouts(
            model,
            batch.prompts,
            params=p,
            seed=rollout_seed(job.seed, step, ctx.rank),
            pad_id=self.source.pad_id,
            eos_id=self.eos_id,
            device=ctx.device,
        )
        model.train()
        scores = self._score(rollouts, batch.answers)
        advantages = group_advantages(
            scores[:, 0].float(), p.group_size, scale=p.scale_rewards == "group"
        ).to(ctx.device)
        rows = p.micro_batch_size * p.group_size
        chunks = [rollouts.rows(i, i + rows) for i in range(0, rollouts.sequences.size(0), rows)]
        local = [float(rollouts.response_mask.sum()), float(rollouts.attention_mask.sum())]
        response_tokens, tokens = all_reduce_sum(local, ctx)
        t = p.temperature
        with torch.no_grad():
            ref_logp = [response_logprobs(self.reference, c, temperature=t) for c in chunks]
            # One epoch: the old policy is the current one, so old = logp.detach() below.
            old_logp = (
                [response_logprobs(model, c, temperature=t) for c in chunks]
                if p.ppo_epochs > 1
                else None
            )
        distributed.reshard(self.reference)  # no backward frees its root and last layer
        sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss, kl, clipped
        grad_norm = 0.0
        for epoch in range(p.ppo_epochs):
            for i, chunk in enumerate(chunks):
                if isinstance(model, FSDPModule):
                    model.set_requires_gradient_sync(i == len(chunks) - 1)
                logp = response_logprobs(model, chunk, temperature=t)
                old = logp.detach() if old_logp is None else old_logp[i]
                adv = advantages[i * rows : (i + 1) * rows]
                kl = k3_kl(logp, ref_logp[i])
                per_token = clipped_objective(logp, old, adv, p.clip_eps) + p.kl_coef * kl
                mask = chunk.response_mask.to(per_token.dtype)
                loss_sum = (per_token * mask).sum()
                # FSDP averages gradients over ranks; x world_size: a mean over all tokens.
                (loss_sum * (ctx.world_size / response_tokens)).backward()  # type: ignore[no-untyped-call]
                with torch.no_grad():
                    clipped = ((logp - old).exp() - 1.0).abs() > p.clip_eps
                    sums[0] += loss_sum.detach()
                    if epoch == 0:
                        sums[1] += (kl * mask).sum()
                    sums[2] += (clipped * mask).sum()
            grad_norm = optimizer_step(model, optimizer, grad_clip=p.grad_clip)
        num_rows = float(scores.size(0))
        stats = all_reduce_sum([*sums.tolist(), *scores.sum(dim=0).tolist(), num_rows], ctx)
        loss, kl_sum, clipped_sum, reward, correct, formatted, total_rows = stats
        updates = response_tokens * p.ppo_epochs
        return StepOutcome(
            loss=loss / updates,
            tokens=int(tokens),
            grad_norm=grad_norm,
            metrics={
                "reward": reward / total_rows,
                "accuracy": correct / total_rows,
                "format": formatted / total_rows,
                "kl": kl_sum / response_tokens,
                "clip_frac": clipped_sum / updates,
                "response_len": response_tokens / total_rows,
            },
        )
