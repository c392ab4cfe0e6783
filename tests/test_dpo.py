"""DPO pieces: synthetic pairs, the pair batches, and the loss against TRL's DPOTrainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from openrelease.data import synthetic
from openrelease.data.store import DataStore
from openrelease.data.tasks import extract_answer, format_reasoning
from openrelease.params import ModelParams
from openrelease.train.dpo import PairSource, preference_loss, sequence_logprobs
from openrelease.train.job import IGNORE_INDEX, MicroBatch
from openrelease.train.model import SpecialTokens, build_model

DEVICE = torch.device("cpu")


def test_synthetic_pairs_prefer_the_correct_worked_answer() -> None:
    problems = synthetic.generate_problems(7, 200, max_operand=9)
    pairs = synthetic.preference_pairs(7, problems, label="train")
    assert pairs == synthetic.preference_pairs(7, problems, label="train")  # seeded
    assert pairs != synthetic.preference_pairs(7, problems, label="eval")
    for problem, pair in zip(problems, pairs, strict=True):
        assert pair.prompt == problem.prompt
        assert extract_answer(pair.chosen) == problem.answer
        wrong = extract_answer(pair.rejected)
        assert wrong is not None and 1 <= abs(wrong - problem.answer) <= 3
        assert wrong >= 0 or problem.answer < 0
        # The same (correct) worked solution: the pair differs only in the final answer.
        cut = pair.chosen.rindex("answer is ")
        assert (
            pair.rejected[:cut]
            == pair.chosen[:cut]
            == format_reasoning(problem.reasoning, "")[:cut]
        )


@pytest.fixture(scope="module")
def tokenizer(data_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DataStore(data_dir).tokenizer_dir))


def test_pair_batches_hold_chosen_then_rejected_rows(data_dir: Path, tokenizer: Any) -> None:
    records = DataStore(data_dir).records("dpo")
    source = PairSource(records, tokenizer=tokenizer, seq_len=128)
    assert source.num_samples == len(records) > 0
    (mb,) = source.micro_batches([3, 0], micro_batch_size=2)
    assert mb.input_ids.shape[0] == 4
    for row, (index, field) in enumerate([(3, "chosen"), (0, "chosen"), (3, "rejected")]):
        ids = mb.input_ids[row][mb.attention_mask[row].bool()].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=False)
        rec = records[index]
        assert text == f"<|user|>{rec['prompt']}<|assistant|>{rec[field]}<|eos|>"
        targets = mb.labels[row][mb.labels[row] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(targets, skip_special_tokens=False) == f"{rec[field]}<|eos|>"
    assert len(source.micro_batches(list(range(8)), micro_batch_size=4)) == 2


# --------------------------------------------------------------------------- against TRL


def _tiny_model(tokenizer: Any, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    params = ModelParams(
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        init_std=0.2,  # large weights: log-ratios far from 0, so every loss term matters
    )
    special = SpecialTokens(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model: torch.nn.Module = build_model(params, vocab_size=len(tokenizer), special=special)
    return model


def _trl_step(
    tmp_path: Path, tokenizer: Any, rows: list[dict[str, str]], **config: Any
) -> tuple[dict[str, Any], float, dict[str, float]]:
    """TRL's own DPOTrainer loss on one batch.

    Returns:
        TRL's collated batch with the log-probs TRL's models give it (``policy_logps``,
        ``reference_logps``: [chosen..., rejected...]) and the models; TRL's loss; and the
        metrics TRL logged for the batch.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, reference = _tiny_model(tokenizer, 1), _tiny_model(tokenizer, 2)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(rows),
        report_to=[],
        use_cpu=True,
        max_length=None,
        **config,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, batch))
        # The same forward TRL's loss makes (its fused LM head), summed per sequence.
        completion = batch["completion_mask"]
        labels = batch["input_ids"].masked_fill(completion == 0, IGNORE_INDEX)
        for name, model in (("policy", trainer.model), ("reference", trainer.ref_model)):
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=labels,
                fused_lm_head=True,
                use_cache=False,
            )
            batch[f"{name}_logps"] = out.log_probs[:, -(completion.size(1) - 1) :].sum(dim=1)
            batch[name] = model
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return batch, loss, logged


def _ours(batch: dict[str, Any], **loss_kw: Any) -> dict[str, float]:
    """openrelease's loss and metrics on the log-probs of TRL's batch (rows: chosen, rejected)."""
    logp, ref = batch["policy_logps"], batch["reference_logps"]
    counts = batch["completion_mask"][:, 1:].sum(dim=1)
    n = logp.size(0) // 2
    terms = preference_loss(
        logp[:n],
        logp[n:],
        ref[:n],
        ref[n:],
        chosen_tokens=counts[:n],
        rejected_tokens=counts[n:],
        **loss_kw,
    )
    return {
        "loss": float(terms.losses.mean()),
        "rewards/chosen": float(terms.chosen_rewards.mean()),
        "rewards/rejected": float(terms.rejected_rewards.mean()),
        "rewards/margins": float((terms.chosen_rewards - terms.rejected_rewards).mean()),
        "rewards/accuracies": float((terms.chosen_rewards > terms.rejected_rewards).float().mean()),
        "logps/chosen": float(logp[:n].mean()),
        "logps/rejected": float(logp[n:].mean()),
    }


def _pairs(data_dir: Path) -> list[dict[str, str]]:
    records = DataStore(data_dir).records("dpo")[:6]
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records]


@pytest.mark.slow
@pytest.mark.parametrize(("loss_type", "beta"), [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.3)])
def test_loss_margins_and_accuracy_equal_trl(
    data_dir: Path, tokenizer: Any, tmp_path: Path, loss_type: str, beta: float
) -> None:
    batch, trl_loss, trl = _trl_step(
        tmp_path, tokenizer, _pairs(data_dir), beta=beta, loss_type=[loss_type]
    )
    ours = _ours(batch, beta=beta, loss_type=loss_type)
    assert ours["loss"] == pytest.approx(trl_loss, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ours[key] == pytest.approx(trl[key], abs=1e-6), key
    for key in ("logps/chosen", "logps/rejected"):
        assert ours[key] == pytest.approx(trl[key], abs=1e-6), key
    # The fixed batch is not degenerate: margins are far from 0 and some pairs are lost.
    assert abs(ours["rewards/margins"]) > 1e-2 and 0.0 < ours["rewards/accuracies"] < 1.0


@pytest.mark.slow
def test_sequence_logprobs_equal_trls(data_dir: Path, tokenizer: Any, tmp_path: Path) -> None:
    """Our log-probs (full logits, fp32) against TRL's fused, tiled LM head: relative 1e-6."""
    batch, _, _ = _trl_step(tmp_path, tokenizer, _pairs(data_dir), loss_type=["sigmoid"])
    ids, completion = batch["input_ids"], batch["completion_mask"]
    mb = MicroBatch(
        input_ids=ids,
        labels=ids.masked_fill(completion == 0, IGNORE_INDEX),
        attention_mask=batch["attention_mask"],
    )
    for name in ("policy", "reference"):
        with torch.no_grad():
            logp, counts = sequence_logprobs(batch[name], mb, device=DEVICE)
        torch.testing.assert_close(logp, batch[f"{name}_logps"], rtol=1e-6, atol=1e-6)
        assert counts.tolist() == completion[:, 1:].sum(dim=1).tolist()


@pytest.mark.slow
def test_label_smoothing_is_trls_loss_averaged_over_flipped_labels(
    data_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    """cDPO: a share e of flipped labels makes the TRL sigmoid loss (1-e) L(c,r) + e L(r,c)."""
    pairs = _pairs(data_dir)
    flipped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    batch, straight, _ = _trl_step(tmp_path, tokenizer, pairs, beta=0.2, loss_type=["sigmoid"])
    _, swapped, _ = _trl_step(tmp_path, tokenizer, flipped, beta=0.2, loss_type=["sigmoid"])
    ours = _ours(batch, beta=0.2, loss_type="sigmoid", label_smoothing=0.25)
    assert ours["loss"] == pytest.approx(0.75 * straight + 0.25 * swapped, abs=1e-6)
