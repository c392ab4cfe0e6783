"""Eval stage on tiny random checkpoints written in the trainer's layout."""

import json
import shutil
from pathlib import Path

import pytest

from openrelease.digest import hash_folder, sha256_tree
from openrelease.eval.stage import EvalResult, run_eval_stage
from openrelease.manifest import CheckpointMeta, FileEntry, StageManifest, write_json
from openrelease.params import PipelineParams

pytestmark = pytest.mark.slow


def _fake_stage(project: Path, params: PipelineParams, stage: str, steps: list[int]) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    stage_dir = project / "artifacts" / stage
    metas = []
    parent = None
    for step in steps:
        torch.manual_seed(step)
        cfg = LlamaConfig(
            vocab_size=320,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
        ckpt = stage_dir / "checkpoints" / f"step-{step}"
        LlamaForCausalLM(cfg).save_pretrained(ckpt)
        for f in (project / "artifacts/data/tokenizer").iterdir():
            shutil.copy(f, ckpt / f.name)
        files = hash_folder(ckpt)
        meta = CheckpointMeta(
            stage=stage,
            step=step,
            tokens_seen=step * 512,
            samples_seen=step * 8,
            sample_range=(0, step * 8),
            data_digest="sha256:" + "d" * 64,
            loss=1.0 / step,
            params_digest="sha256:" + "p" * 64,
            parent_digest=parent,
            files=tuple(
                FileEntry(path=p, size=(ckpt / p).stat().st_size, sha256=d)
                for p, d in sorted(files.items())
            ),
            checkpoint_digest=sha256_tree(files),
        )
        write_json(ckpt / "meta.json", meta)
        metas.append(meta)
        parent = meta.checkpoint_digest
    write_json(
        stage_dir / "manifest.json",
        StageManifest(
            stage=stage,
            final_step=steps[-1],
            checkpoints=tuple(metas),
            final_checkpoint=f"artifacts/{stage}/checkpoints/step-{steps[-1]}",
        ),
    )
    rows = [
        {"step": s, "loss": 5.0 / s, "tokens_seen": s * 512, "reward": 0.1 * s, "kl": 0.01}
        for s in range(1, steps[-1] + 1)
    ]
    (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_eval_all_checkpoints_then_rerun_is_a_noop(
    project: Path, tiny_params: PipelineParams
) -> None:
    _fake_stage(project, tiny_params, "pretrain", [2, 4])
    _fake_stage(project, tiny_params, "grpo", [2])
    seen: list[str] = []
    summary = run_eval_stage(
        tiny_params, project_dir=project, progress=lambda what, i, n: seen.append(f"{i}/{n} {what}")
    )
    assert summary.evaluated == 3 and summary.skipped == 0
    assert seen[0] == "1/3 pretrain step 2"
    result = EvalResult.model_validate_json(
        (project / "artifacts/eval/results/pretrain/step-4.json").read_text()
    )
    assert set(result.metrics) == {
        "heldout_loss",
        "heldout_ppl",
        "arithmetic_exact_match",
        "arithmetic_format_rate",
        "heldout_preference_accuracy",
        "heldout_preference_margin",
    }
    assert 0.0 <= result.metrics["heldout_preference_accuracy"] <= 1.0
    # A random 320-token model is close to uniform: loss near ln(320) = 5.77.
    assert 4.5 < result.metrics["heldout_loss"] < 7.5
    assert 0.0 <= result.metrics["arithmetic_exact_match"] <= 1.0
    metrics = json.loads((project / "artifacts/eval/metrics.json").read_text())
    assert set(metrics) == {"pretrain", "grpo"} and metrics["pretrain"]["step"] == 4
    assert (project / "artifacts/eval/curve.csv").read_text().startswith("stage,step,tokens_seen,")
    samples = (project / "artifacts/eval/samples/pretrain.jsonl").read_text().splitlines()
    assert len(samples) == tiny_params.eval.num_samples
    assert json.loads(samples[0])["generation"]["seed"] == 4242
    names = {Path(p).name for p in summary.plots}
    assert {
        "training_loss.png",
        "training_loss.svg",
        "eval_metrics.png",
        "grpo_reward_kl.svg",
    } <= names
    assert all(Path(p).stat().st_size > 1000 for p in summary.plots)
    again = run_eval_stage(tiny_params, project_dir=project)
    assert again.evaluated == 0 and again.skipped == 3
    assert again.results == summary.results


def test_user_jsonl_task_without_code(project: Path, tiny_params: PipelineParams) -> None:
    _fake_stage(project, tiny_params, "sft", [2])
    (project / "capitals.jsonl").write_text('{"prompt": "2+2?", "answer": "4"}\n')
    params = tiny_params.model_copy(
        update={
            "eval": tiny_params.eval.model_copy(
                update={"tasks": ("capitals.jsonl",), "num_samples": 0}
            )
        }
    )
    summary = run_eval_stage(params, project_dir=project)
    assert set(summary.results[0].metrics) == {"capitals_exact_match", "capitals_format_rate"}


def test_response_text_keeps_think_tags_and_stops_at_eos(data_dir: Path) -> None:
    from transformers import AutoTokenizer

    from openrelease.data.tasks import has_reasoning_format
    from openrelease.eval.stage import _response_text

    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    ids = tok.encode("<think>2 + 2 = 4.</think> The answer is 4.", add_special_tokens=False)
    ids += [tok.eos_token_id, *tok.encode("junk after eos", add_special_tokens=False)]
    ids += [tok.pad_token_id] * 3
    text = _response_text(tok, ids)
    assert text.startswith("<think>") and "junk" not in text
    assert has_reasoning_format(text)


def test_preference_scores_the_pairs_as_the_dpo_stage_encodes_them(
    project: Path, tiny_params: PipelineParams
) -> None:
    """Eval's batched, reference-free score equals the trainer's log-probs on the same pairs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrelease.data.store import DataStore
    from openrelease.eval.stage import _preference
    from openrelease.train.dpo import PairSource, sequence_logprobs

    _fake_stage(project, tiny_params, "dpo", [2])
    ckpt = project / "artifacts/dpo/checkpoints/step-2"
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt, padding_side="left")
    store = DataStore(project / "artifacts/data")
    got = _preference(model, tok, store, limit=20)

    pairs = store.records("eval_dpo")[:20]
    source = PairSource(pairs, tokenizer=tok, seq_len=10_000)
    diffs = []
    with torch.no_grad():
        for mb in source.micro_batches(list(range(len(pairs))), micro_batch_size=5):
            logp, _ = sequence_logprobs(model, mb, device=torch.device("cpu"))
            diffs += (logp[:5] - logp[5:]).tolist()
    assert got["heldout_preference_accuracy"] == sum(d > 0 for d in diffs) / len(pairs)
    assert got["heldout_preference_margin"] == pytest.approx(sum(diffs) / len(pairs), abs=1e-4)
    assert 0.0 < got["heldout_preference_accuracy"] < 1.0  # a random model wins some, loses some
