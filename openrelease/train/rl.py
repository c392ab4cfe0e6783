"""GRPO: sharded-policy rollouts, verifiable rewards, group advantages, clip + k3 KL loss.

Sampling is seeded per (seed, step, rank), so a rerun or a resume draws the same rollouts.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from openrelease.data.tasks import has_reasoning_format, is_correct
from openrelease.params import GRPOParams
from openrelease.train.distributed import gathered

RewardFn = Callable[[str, str, int], float]


def correctness_reward(text: str, answer: str, num_tokens: int) -> float:
    """1 when the extracted final answer equals the reference, else 0."""
    return 1.0 if is_correct(text, answer) else 0.0


def format_reward(text: str, answer: str, num_tokens: int) -> float:
    """1 when the response has a non-empty think block followed by an answer sentence."""
    return 1.0 if has_reasoning_format(text) else 0.0


def length_penalty(text: str, answer: str, num_tokens: int) -> float:
    """Minus the response length in thousands of tokens (weight it to taste)."""
    return -num_tokens / 1000.0


REWARDS: dict[str, RewardFn] = {
    "correctness": correctness_reward,
    "format": format_reward,
    "length": length_penalty,
}


def total_reward(text: str, answer: str, num_tokens: int, weights: dict[str, float]) -> float:
    """Weighted sum of the verifiers named in ``grpo.rewards``."""
    return sum(w * REWARDS[name](text, answer, num_tokens) for name, w in weights.items())


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-4, *, scale: bool = True
) -> torch.Tensor:
    """(r - mean) / (std + eps) within each consecutive group of ``group_size`` rollouts.

    Not ``scale`` (``grpo.scale_rewards: none``): r - mean.
    """
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if not scale:
        return centred.view(-1)
    std = grouped.std(dim=1, keepdim=True, unbiased=False)
    return (centred / (std + eps)).view(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(d) - d - 1 with d = ref - logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def clipped_objective(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> torch.Tensor:
    """Per-token PPO-clip loss (to minimise) for advantages broadcast over tokens."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    return -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """The sampling seed of one rank at one GRPO step (a pure function)."""
    digest = hashlib.sha256(f"grpo-rollout:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class Rollouts:
    """Prompts (left-padded) followed by fixed-length responses, with their masks."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    """1 on response tokens up to and including the first eos."""
    prompt_len: int

    def rows(self, start: int, stop: int) -> Rollouts:
        """Rollouts ``start:stop`` (for micro-batching)."""
        return Rollouts(
            self.sequences[start:stop],
            self.attention_mask[start:stop],
            self.response_mask[start:stop],
            self.prompt_len,
        )


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The KV-cache argument: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    return out["cache"] if "cache" in out else out["past_key_values"]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample_rollouts(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    *,
    params: GRPOParams,
    seed: int,
    pad_id: int,
    eos_id: int,
    device: torch.device,
) -> Rollouts:
    """Sample ``group_size`` responses per prompt, exactly ``max_new_tokens`` forwards each.

    Every rank runs the same number of forward passes (sharded weights need the collectives in
    lockstep); after eos a row only emits padding. Weights stay gathered for the whole rollout.
    """
    rows = [p for p in prompts for _ in range(params.group_size)]
    width = max(len(p) for p in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, p in enumerate(rows):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    cache_kw = _cache_kwarg(model)
    with gathered(model):
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True
        )
        cache, logits = _cache_of(out), out.logits[:, -1]
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        new_tokens, new_mask = [], []
        for _ in range(params.max_new_tokens):
            probs = _filtered_probs(logits.float(), params.temperature, params.top_p)
            token = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            new_mask.append((~done).long())
            new_tokens.append(token)
            done |= token == eos_id
            mask = torch.cat([mask, torch.ones_like(token).unsqueeze(1)], dim=1)
            out = model(
                input_ids=token.unsqueeze(1),
                attention_mask=mask,
                position_ids=_positions(mask)[:, -1:],
                use_cache=True,
                **{cache_kw: cache},
            )
            cache, logits = _cache_of(out), out.logits[:, -1]
    response = torch.stack(new_tokens, dim=1)
    response_mask = torch.stack(new_mask, dim=1)
    attention = torch.cat([mask[:, :width], response_mask], dim=1)
    return Rollouts(torch.cat([ids, response], dim=1), attention, response_mask, width)


def _filtered_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
    sorted_probs = sorted_probs * keep
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def response_logprobs(
    model: torch.nn.Module, rollouts: Rollouts, *, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities of the response tokens under ``model`` ([rows, max_new_tokens]).

    Of the distribution the rollouts were sampled from: logits divided by the sampling
    ``temperature`` (as TRL's GRPO does), for the policy, the old policy and the reference.
    """
    mask = rollouts.attention_mask
    logits = model(
        input_ids=rollouts.sequences,
        attention_mask=mask,
        position_ids=_positions(mask),
        use_cache=False,
    ).logits
    start = rollouts.prompt_len
    shifted = logits[:, start - 1 : -1].float()
    if temperature != 1.0:
        shifted = shifted / temperature
    targets = rollouts.sequences[:, start:]
    return torch.gather(F.log_softmax(shifted, dim=-1), 2, targets.unsqueeze(2)).squeeze(2)
