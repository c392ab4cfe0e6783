"""The eval stage: metrics for every recorded checkpoint, sample outputs, DVC metrics and plots.

Checkpoints already evaluated (same checkpoint digest, same eval params) are skipped on a rerun.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from openrelease.data.store import DataStore, read_jsonl
from openrelease.data.tasks import extract_answer, has_reasoning_format
from openrelease.digest import sha256_json
from openrelease.errors import ParamsError
from openrelease.eval.harness import (
    HarnessPlan,
    harness_fingerprint,
    harness_metrics,
    harness_tags,
    plan_harness,
    write_harness_outputs,
)
from openrelease.eval.progress import Heartbeat
from openrelease.layout import (
    EVAL_CURVE,
    EVAL_CURVES,
    EVAL_METRICS,
    STAGE_MANIFEST,
    Workspace,
    checkpoint_rel,
    eval_curve_rel,
    eval_result_rel,
)
from openrelease.manifest import (
    CheckpointMeta,
    EvalResult,
    InputRecord,
    StageManifest,
    StageRecord,
    read_model,
    write_json,
    write_text_atomic,
)
from openrelease.params import EvalParams, PipelineParams
from openrelease.record.runinfo import model_key, pipeline_step
from openrelease.record.tracking import StageTracker

Progress = Callable[[str, int, int], None]
EVAL_DIR = "artifacts/eval"
SAMPLE_SEED = 4242


class EvalSummary(BaseModel):
    """What one eval run did."""

    model_config = ConfigDict(frozen=True)
    evaluated: int
    skipped: int
    results: tuple[EvalResult, ...]
    plots: tuple[str, ...]


def _task_problems(
    task: str, store: DataStore, project_dir: Path, limit: int
) -> list[dict[str, str]]:
    if task == "arithmetic":
        rows = store.records("eval_problems")
    else:
        path = project_dir / task
        if not path.is_file():
            raise ParamsError(
                f"eval.tasks: {task!r} is neither a built-in task "
                "(heldout_loss, arithmetic, preference) nor a JSONL file of {prompt, answer}."
            )
        rows = read_jsonl(path)
        for i, row in enumerate(rows, start=1):
            if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
                raise ParamsError(f"{task}:{i}: each line needs prompt and answer.")
    return rows[:limit]


def _heldout_loss(model: Any, store: DataStore, *, limit: int) -> dict[str, float]:
    import torch

    from openrelease.data.tokenizer import BOS, EOS

    tok = _fast_tokenizer(store.tokenizer_dir)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    stream: list[int] = []
    for row in store.records("eval_text"):
        stream += [bos, *tok.encode(row["text"]).ids, eos]
    seq_len = store.manifest.seq_len
    n = min(limit, len(stream) // seq_len)
    if n == 0:
        return {}
    ids = torch.tensor(stream[: n * seq_len]).view(n, seq_len)
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in torch.split(ids, 8):
            loss = model(input_ids=chunk, labels=chunk).loss
            tokens = chunk.numel() - chunk.shape[0]
            total += float(loss) * tokens
            count += tokens
    mean = total / count
    return {"heldout_loss": mean, "heldout_ppl": math.exp(min(mean, 50.0))}


def _preference(model: Any, tokenizer: Any, store: DataStore, *, limit: int) -> dict[str, float]:
    """Held-out preference pairs: how often the chosen response gets the higher log-prob.

    Reference-free (summed log-probs of each response given the prompt, in the chat format
    the dpo stage trains on), so every stage's checkpoints compare on one scale.
    """
    import torch

    from openrelease.data.tokenizer import ASSISTANT, EOS, USER

    if "eval_dpo" not in store.manifest.datasets:
        return {}  # data built before preference pairs existed
    rows = store.records("eval_dpo")[:limit]
    if not rows:
        return {}

    diffs: list[float] = []
    for start in range(0, len(rows), 16):
        chunk = rows[start : start + 16]
        heads = [
            tokenizer.encode(f"{USER}{r['prompt']}{ASSISTANT}", add_special_tokens=False)
            for r in chunk
        ]
        tails = [
            tokenizer.encode(f"{r[field]}{EOS}", add_special_tokens=False)
            for field in ("chosen", "rejected")
            for r in chunk
        ]
        seqs = [h + t for h, t in zip(heads + heads, tails, strict=True)]
        width = max(len(q) for q in seqs)
        ids = torch.full((len(seqs), width), int(tokenizer.pad_token_id))
        mask = torch.zeros_like(ids)
        scored = torch.zeros_like(ids, dtype=torch.bool)  # the response tokens (targets)
        for i, (seq, head) in enumerate(zip(seqs, heads + heads, strict=True)):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            scored[i, len(head) : len(seq)] = True
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        token_logp = torch.log_softmax(logits, dim=-1).gather(2, ids[:, 1:].unsqueeze(2))
        logp = (token_logp.squeeze(2) * scored[:, 1:]).sum(dim=1)
        diffs += (logp[: len(chunk)] - logp[len(chunk) :]).tolist()
    wins, margin = sum(d > 0 for d in diffs), sum(diffs)
    return {
        "heldout_preference_accuracy": wins / len(rows),
        "heldout_preference_margin": margin / len(rows),
    }


def _fast_tokenizer(tokenizer_dir: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    sample_seed: int | None = None,
) -> list[str]:
    """Answer chat prompts (greedy, or seeded sampling when ``sample_seed`` is given)."""
    import torch

    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    outputs: list[str] = []
    for start in range(0, len(texts), 16):
        batch = tokenizer(
            texts[start : start + 16], return_tensors="pt", padding=True, add_special_tokens=False
        )
        kwargs: dict[str, Any] = {"do_sample": False}
        if sample_seed is not None:
            torch.manual_seed(sample_seed + start)
            kwargs = {"do_sample": True, "temperature": 0.8, "top_p": 0.95}
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **kwargs,
            )
        new = out[:, batch["input_ids"].shape[1] :]
        outputs += [_response_text(tokenizer, row.tolist()) for row in new]
    return outputs


def _response_text(tokenizer: Any, ids: list[int]) -> str:
    """Decode a response up to its first eos, keeping <think> tags (they are special tokens)."""
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    ids = [i for i in ids if i != tokenizer.pad_token_id]
    text: str = tokenizer.decode(ids, skip_special_tokens=False)
    return text


def _generative_metrics(
    model: Any, tokenizer: Any, task: str, rows: list[dict[str, str]], *, max_new_tokens: int
) -> dict[str, float]:
    if not rows:
        return {}
    answers = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens)
    name = "arithmetic" if task == "arithmetic" else re.sub(r"\W+", "_", Path(task).stem)
    correct = sum(
        extract_answer(a) is not None and str(extract_answer(a)) == str(r["answer"])
        for a, r in zip(answers, rows, strict=True)
    )
    formatted = sum(has_reasoning_format(a) for a in answers)
    return {
        f"{name}_exact_match": correct / len(rows),
        f"{name}_format_rate": formatted / len(rows),
    }


def _load(checkpoint_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # we draw our own
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, use_safetensors=True)
    model.eval()  # type: ignore[no-untyped-call]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir, padding_side="left")
    return model, tokenizer


def evaluate_checkpoint(
    checkpoint_dir: Path, *, store: DataStore, params: EvalParams, project_dir: Path
) -> dict[str, float]:
    """All configured metrics for one checkpoint folder."""
    model, tokenizer = _load(checkpoint_dir)
    metrics: dict[str, float] = {}
    for task in params.tasks:
        if task == "heldout_loss":
            metrics |= _heldout_loss(model, store, limit=params.max_examples)
        elif task == "preference":
            metrics |= _preference(model, tokenizer, store, limit=params.max_examples)
        else:
            rows = _task_problems(task, store, project_dir, params.max_examples)
            metrics |= _generative_metrics(
                model, tokenizer, task, rows, max_new_tokens=params.max_new_tokens
            )
    return metrics


def _eval_digest(params: EvalParams, store: DataStore, project_dir: Path) -> str:
    return sha256_json(
        {
            "eval": params.model_dump(mode="json"),
            "data": store.manifest.data_digest,
            "lm_eval": harness_fingerprint(params.lm_eval, project_dir=project_dir),
        }
    )


def _stage_manifests(project_dir: Path, stages: tuple[str, ...]) -> dict[str, StageManifest]:
    out: dict[str, StageManifest] = {}
    for stage in stages:
        path = Workspace(project_dir).stage_manifest(stage)
        if path.exists():
            out[stage] = read_model(path, StageManifest)
    return out


def write_samples(
    stage: str,
    checkpoint_dir: Path,
    *,
    store: DataStore,
    params: EvalParams,
    out_path: Path,
    checkpoint: str | None = None,
) -> None:
    """Answer a fixed prompt set with the stage's final checkpoint; save JSONL + settings.

    ``checkpoint`` is the name recorded for the checkpoint (its workspace-relative path), so
    the samples carry no absolute path of the machine.
    """
    if params.num_samples == 0:
        return
    model, tokenizer = _load(checkpoint_dir)
    rows = store.records("eval_problems")[: params.num_samples]
    answers = generate(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        max_new_tokens=params.max_new_tokens,
        sample_seed=SAMPLE_SEED,
    )
    settings = {
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.95,
        "seed": SAMPLE_SEED,
        "max_new_tokens": params.max_new_tokens,
        "checkpoint": checkpoint or checkpoint_dir.as_posix(),
    }
    lines = [
        json.dumps(
            {
                "stage": stage,
                "prompt": r["prompt"],
                "reference": r["answer"],
                "output": a,
                "generation": settings,
            },
            sort_keys=True,
        )
        + "\n"
        for r, a in zip(rows, answers, strict=True)
    ]
    write_text_atomic(out_path, "".join(lines))


def run_eval_stage(
    params: PipelineParams,
    *,
    project_dir: Path,
    progress: Progress | None = None,
    log_every_s: float | None = None,
) -> EvalSummary:
    """Evaluate every checkpoint not evaluated before; write results, DVC metrics and plots.

    With ``log_every_s``, each step is logged as it starts and a heartbeat line follows at
    least that often (progress in a non-TTY log such as `dvc exp run`'s).
    """
    import torch

    torch.manual_seed(0)
    store = DataStore(project_dir / params.data.out_dir)
    eval_dir = project_dir / EVAL_DIR
    digest = _eval_digest(params.eval, store, project_dir)
    manifests = _stage_manifests(project_dir, params.train_stages)
    todo = [(s, c) for s, m in manifests.items() for c in m.checkpoints]
    harness = plan_harness(
        params.eval.lm_eval,
        {s: m.checkpoints for s, m in manifests.items()},
        project_dir=project_dir,
    )
    tracker = StageTracker("eval", params=params, project_dir=project_dir, out_dir=eval_dir)
    data_manifest = store.data_dir / STAGE_MANIFEST
    tracker.start(  # the same name and digest as the training stages give this input
        [
            InputRecord(
                name="data-manifest",
                kind="data",
                path=data_manifest.relative_to(project_dir).as_posix(),
                digest=store.manifest.data_digest,
            )
        ]
    )
    run_keys = _model_keys(project_dir, list(manifests))
    for stage, meta in todo:  # every checkpoint evaluated: a LoggedModel input of this run
        tracker.log_model_input(_model_key(run_keys, stage, meta), meta.checkpoint_digest)
    try:
        with Heartbeat(log_every_s) as beat:
            summary = _evaluate_all(
                params,
                project_dir,
                store,
                todo,
                manifests,
                digest,
                tracker,
                progress,
                harness,
                beat,
            )
    except BaseException:
        tracker.finish(status="FAILED")
        tracker.send()
        raise
    tracker.finish()
    tracker.send()
    return summary


def _model_key(run_keys: dict[str, str], stage: str, meta: CheckpointMeta) -> str:
    """The LoggedModel key of a checkpoint; a digest key when its stage has no record."""
    if stage in run_keys:
        return model_key(run_keys[stage], meta.step)
    return f"digest:{meta.checkpoint_digest}"


def _model_keys(project_dir: Path, stages: list[str]) -> dict[str, str]:
    """Stage -> the MLflow run key its checkpoints' LoggedModels hang under (from record.json)."""
    keys: dict[str, str] = {}
    for stage in stages:
        path = Workspace(project_dir).record(stage)
        if path.is_file():
            keys[stage] = read_model(path, StageRecord).run_key
    return keys


def _evaluate_all(
    params: PipelineParams,
    project_dir: Path,
    store: DataStore,
    todo: list[tuple[str, CheckpointMeta]],
    manifests: dict[str, StageManifest],
    digest: str,
    tracker: StageTracker,
    progress: Progress | None,
    harness: HarnessPlan | None,
    beat: Heartbeat,
) -> EvalSummary:
    from openrelease.eval.plots import write_plots

    eval_dir = project_dir / EVAL_DIR
    run_keys = _model_keys(project_dir, list(manifests))
    results: list[EvalResult] = []
    evaluated = 0
    for i, (stage, meta) in enumerate(todo, start=1):
        if progress:
            progress(f"{stage} step {meta.step}", i, len(todo))
        beat.step(f"{stage} step {meta.step} ({i}/{len(todo)})")
        result_path = eval_dir / eval_result_rel(stage, meta.step)
        if result_path.exists():
            old = read_model(result_path, EvalResult)
            if old.checkpoint_digest == meta.checkpoint_digest and old.eval_digest == digest:
                results.append(old)
                continue
        ckpt = checkpoint_rel(stage, meta.step)
        metrics = evaluate_checkpoint(
            project_dir / ckpt, store=store, params=params.eval, project_dir=project_dir
        )
        scores = None
        if harness is not None and harness.wants(stage, meta.step):
            beat.step(f"{stage} step {meta.step}: lm-eval {', '.join(harness.params.tasks)}")
            scores = harness.score(project_dir / ckpt)
        result = EvalResult(
            stage=stage,
            step=meta.step,
            tokens_seen=meta.tokens_seen,
            checkpoint=ckpt,
            checkpoint_digest=meta.checkpoint_digest,
            eval_digest=digest,
            metrics=metrics,
            lm_eval=scores,
        )
        write_json(result_path, result)
        results.append(result)
        evaluated += 1
        # `<stage>/<metric>` on the pipeline's step axis, linked to the checkpoint's LoggedModel
        logged = metrics | (harness_metrics(scores) if scores else {})
        key = _model_key(run_keys, stage, meta)
        tracker.log_model_metrics(
            key,
            {f"{stage}/{k}": v for k, v in logged.items()},
            step=pipeline_step(params, stage, meta.step),
            final=True,
        )
        if scores:
            tracker.tag_model(key, harness_tags(scores))
    _log_final_metrics(params, results, tracker)
    for stage, manifest in manifests.items():
        samples = eval_dir / "samples" / f"{stage}.jsonl"
        if evaluated or not samples.exists():
            beat.step(f"{stage}: sample outputs")
            write_samples(
                stage,
                project_dir / manifest.final_checkpoint,
                store=store,
                params=params.eval,
                out_path=samples,
                checkpoint=manifest.final_checkpoint,
            )
    beat.step("writing metrics and plots")
    _write_dvc_outputs(results, eval_dir, params.train_stages)
    write_harness_outputs(results, eval_dir)
    plots = write_plots(
        project_dir, results=[r.model_dump() for r in results], out_dir=eval_dir / "plots"
    )
    return EvalSummary(
        evaluated=evaluated,
        skipped=len(results) - evaluated,
        results=tuple(results),
        plots=tuple(p.as_posix() for p in plots),
    )


def _log_final_metrics(
    params: PipelineParams, results: list[EvalResult], tracker: StageTracker
) -> None:
    """Each stage's final-checkpoint metrics on the pipeline run, so pipelines compare."""
    final: dict[str, EvalResult] = {}
    for r in sorted(results, key=lambda r: r.step):
        final[r.stage] = r
    for stage, r in final.items():
        tracker.log_pipeline_metrics(
            {f"{stage}/{k}": v for k, v in r.metrics.items()},
            step=pipeline_step(params, stage, r.step),
        )


def _write_dvc_outputs(results: list[EvalResult], eval_dir: Path, stages: tuple[str, ...]) -> None:
    """``metrics.json`` (final checkpoint of each stage), ``curve.csv`` and one curve per stage.

    ``curves/<stage>.csv`` are DVC plots (one plot per stage); ``curve.csv`` keeps every stage
    in one table for the bundle.
    """
    final: dict[str, dict[str, float]] = {}
    for r in sorted(results, key=lambda r: r.step):
        final[r.stage] = {**r.metrics, "step": float(r.step)}
    write_json(eval_dir / EVAL_METRICS, final)
    keys = sorted({k for r in results for k in r.metrics})
    header = "stage,step,tokens_seen," + ",".join(keys)
    order = {stage: i for i, stage in enumerate(stages)}
    rows: dict[str, list[str]] = {}
    for r in sorted(results, key=lambda r: (order.get(r.stage, len(order)), r.stage, r.step)):
        values = ",".join(f"{r.metrics[k]:.6g}" if k in r.metrics else "" for k in keys)
        rows.setdefault(r.stage, []).append(f"{r.stage},{r.step},{r.tokens_seen},{values}")
    every = [line for lines in rows.values() for line in lines]
    write_text_atomic(eval_dir / EVAL_CURVE, "\n".join([header, *every]) + "\n")
    curves = eval_dir / EVAL_CURVES
    for old in curves.glob("*.csv") if curves.is_dir() else ():
        if old.stem not in rows:
            old.unlink()
    for stage, lines in rows.items():
        write_text_atomic(eval_dir / eval_curve_rel(stage), "\n".join([header, *lines]) + "\n")
