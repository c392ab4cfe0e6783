"""The model card's lm-evaluation-harness entries, as huggingface_hub `EvalResult` objects.

Each score of the released checkpoint becomes one EvalResult naming the task, its dataset, the
harness version and the settings (n-shot, limit, seed, config hash) that make it comparable.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub import EvalResult as HubEvalResult

from openrelease.manifest import EvalResult

HARNESS_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}
"""``dataset_path`` values that mean local files, not a Hub dataset id."""
TASK_TYPES = {
    "multiple_choice": ("multiple-choice", "Multiple choice"),
    "generate_until": ("text-generation", "Text generation"),
}


def harness_eval_results(result: EvalResult) -> list[HubEvalResult]:
    """One EvalResult per lm-eval score (stderr left out) of the checkpoint ``result`` names."""
    if result.lm_eval is None:
        return []
    record = result.lm_eval
    out: list[HubEvalResult] = []
    for task, r in sorted(record.tasks.items()):
        task_type, task_label = TASK_TYPES.get(r.output_type or "", ("text-generation", "Other"))
        local = r.dataset is None or r.dataset in LOCAL_BUILDERS
        for key, value in sorted(r.scores.items()):
            if "_stderr" in key:
                continue
            metric, _, filt = key.partition(",")
            stderr = r.scores.get(f"{metric}_stderr,{filt}")
            args: dict[str, Any] = {
                "num_fewshot": r.num_fewshot,
                "limit": record.limit,
                "seed": record.seed,
                "config_hash": r.config_hash,
                "checkpoint_digest": result.checkpoint_digest,
            }
            if stderr is not None:
                args["stderr"] = round(stderr, 6)
            out.append(
                HubEvalResult(
                    task_type=task_type,
                    task_name=f"{task_label} ({task})",
                    dataset_type=f"lm-eval/{task}" if local else str(r.dataset),
                    dataset_name=task,
                    dataset_config=None if local else r.dataset_name,
                    dataset_split=r.split,
                    metric_type=metric,
                    metric_name=metric if filt in ("", "none") else f"{metric} ({filt})",
                    metric_value=round(value, 6),
                    metric_config=None if filt in ("", "none") else filt,
                    metric_args=args,
                    source_name=f"lm-evaluation-harness {record.harness_version}",
                    source_url=HARNESS_URL,
                )
            )
    return out

