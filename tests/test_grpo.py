"""GRPO pieces: reward functions, advantages, KL, objective, seeded rollouts on a tiny model."""

import math

import pytest
import torch

from openrelease.params import GRPOParams
from openrelease.train.rl import (
    clipped_objective,
    correctness_reward,
    format_reward,
    group_advantages,
    k3_kl,
    length_penalty,
    response_logprobs,
    rollout_seed,
    sample_rollouts,
    total_reward,
)


def test_rewards() -> None:
    good = "<think>2 + 2 = 4.</think> The answer is 4."
    assert correctness_reward(good, "4", 10) == 1.0
    assert correctness_reward(good, "5", 10) == 0.0
    assert correctness_reward("no idea", "4", 3) == 0.0
    assert format_reward(good, "4", 10) == 1.0
    assert format_reward("The answer is 4.", "4", 5) == 0.0
    assert length_penalty("x", "4", 500) == -0.5
    assert total_reward(good, "4", 10, {"correctness": 1.0, "format": 0.2}) == pytest.approx(1.2)


def test_group_advantages_are_normalised_per_group() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(rewards, group_size=4)
    assert adv[:4].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-3)
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # identical rewards: no signal
    # scale_rewards: none (Dr. GRPO): centred, not scaled, so 3 right of 4 is not 1 right of 2
    mostly = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert group_advantages(mostly, 4, scale=False).tolist() == [0.25, 0.25, 0.25, -0.75]
    assert group_advantages(mostly, 4)[3].item() == pytest.approx(-(3**0.5), abs=1e-3)


def test_k3_kl_is_zero_at_equality_and_positive_elsewhere() -> None:
    logp = torch.tensor([-1.0, -2.0])
    assert k3_kl(logp, logp).tolist() == [0.0, 0.0]
    kl = k3_kl(logp, torch.tensor([-1.5, -1.0]))
    assert (kl > 0).all()
    assert float(kl[0]) == pytest.approx(math.exp(-0.5) + 0.5 - 1)


def test_clipped_objective() -> None:
    old = torch.zeros(1, 2)
    adv = torch.tensor([1.0])
    # ratio e^0.5 > 1 + eps: positive advantage is clipped at 1.2.
    loss = clipped_objective(torch.full((1, 2), 0.5), old, adv, clip_eps=0.2)
    assert loss[0].tolist() == pytest.approx([-1.2, -1.2])
    loss = clipped_objective(torch.zeros(1, 2), old, -adv, clip_eps=0.2)
    assert loss[0].tolist() == pytest.approx([1.0, 1.0])


def _tiny_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def _params(**kw: object) -> GRPOParams:
    base = {
        "num_steps": 2,
        "global_batch_size": 2,
        "micro_batch_size": 1,
        "seq_len": 32,
        "lr": 1e-4,
        "checkpoint_every": 1,
        "group_size": 3,
        "max_new_tokens": 6,
    }
    return GRPOParams.model_validate({**base, **kw})


def test_rollouts_are_seeded_fixed_length_and_masked() -> None:
    model = _tiny_model()
    prompts = [[5, 6, 7], [8, 9]]
    kw = {"params": _params(), "pad_id": 0, "eos_id": 1, "device": torch.device("cpu")}
    a = sample_rollouts(model, prompts, seed=rollout_seed(1, 3, 0), **kw)
    b = sample_rollouts(model, prompts, seed=rollout_seed(1, 3, 0), **kw)
    c = sample_rollouts(model, prompts, seed=rollout_seed(1, 4, 0), **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)
    assert a.sequences.shape == (6, 3 + 6) and a.prompt_len == 3
    # Left padding: the shorter prompt starts with a pad that the mask hides.
    assert a.attention_mask[3, 0] == 0 and a.sequences[3, 0] == 0
    for row in range(6):
        resp, mask = a.sequences[row, 3:], a.response_mask[row]
        eos = (resp == 1).nonzero()
        if len(eos):
            first = int(eos[0])
            assert mask[: first + 1].all() and not mask[first + 1 :].any()
            assert (resp[first + 1 :] == 0).all()
        else:
            assert mask.all()


def test_response_logprobs_match_a_plain_forward() -> None:
    model = _tiny_model()
    r = sample_rollouts(
        model,
        [[5, 6, 7]],
        params=_params(group_size=2),
        seed=7,
        pad_id=0,
        eos_id=1,
        device=torch.device("cpu"),
    )
    with torch.no_grad():
        logp = response_logprobs(model, r)
        full = torch.log_softmax(model(input_ids=r.sequences[:1]).logits.float(), -1)
    expected = full[0, 2:-1].gather(1, r.sequences[0, 3:].unsqueeze(1)).squeeze(1)
    assert logp.shape == (2, 6)
    assert torch.allclose(logp[0], expected, atol=1e-5)
    # At a sampling temperature, of the tempered distribution the tokens were drawn from.
    with torch.no_grad():
        hot = response_logprobs(model, r, temperature=0.5)
        tempered = torch.log_softmax(model(input_ids=r.sequences[:1]).logits.float() / 0.5, -1)
    expected = tempered[0, 2:-1].gather(1, r.sequences[0, 3:].unsqueeze(1)).squeeze(1)
    assert torch.allclose(hot[0], expected, atol=1e-5)
    assert not torch.allclose(hot[0], logp[0], atol=1e-3)


@pytest.mark.parametrize("scale", [True, False])
def test_the_update_raises_the_reward_it_is_given(scale: bool) -> None:
    """Rollouts, group advantages, the clipped objective and the log-probs together push the
    policy towards what the reward pays for (here: response tokens from the lower half of the
    vocabulary), and a negated reward pushes it away: the pieces have the right signs and line
    up row by row."""

    def mean_reward(sign: float) -> tuple[float, float]:
        model = _tiny_model().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        params = _params(group_size=8, max_new_tokens=4)
        rewards = []
        for step in range(20):
            r = sample_rollouts(
                model,
                [[5, 6, 7], [8, 10]],
                params=params,
                seed=step,
                pad_id=0,
                eos_id=1,
                device=torch.device("cpu"),
            )
            hits = (r.sequences[:, r.prompt_len :] < 32).float() * r.response_mask
            reward = hits.sum(dim=1) / params.max_new_tokens
            rewards.append(reward.mean().item())
            logp = response_logprobs(model, r)
            adv = group_advantages(sign * reward, params.group_size, scale=scale)
            mask = r.response_mask.float()
            loss = (clipped_objective(logp, logp.detach(), adv, 0.2) * mask).sum() / mask.sum()
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        return sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3

    first, last = mean_reward(1.0)
    assert last > first + 0.25  # from about 0.4 (32 of 64 tokens, and eos)
    first, last = mean_reward(-1.0)
    assert last < first - 0.2
