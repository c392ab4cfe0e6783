"""lm-evaluation-harness on one checkpoint: its scores and what makes them comparable.

Runs lm-eval's Python API (`simple_evaluate` on an `HFLM` wrapping the loaded model) and turns its
results into a `HarnessRecord`; used by the eval stage and by `openrelease eval --checkpoint`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from openrelease.digest import hash_folder, sha256_json, sha256_tree
from openrelease.errors import ArtifactError, ParamsError
from openrelease.eval.tasks import TASKS_DIR
from openrelease.layout import EVAL_LM_EVAL, EVAL_LM_EVAL_CURVE
from openrelease.manifest import (
    CheckpointMeta,
    EvalResult,
    HarnessRecord,
    HarnessTaskResult,
    write_json,
    write_text_atomic,
)
from openrelease.params import LmEvalParams

logger = logging.getLogger(__name__)

PROMPT_FIELDS = (
    "description",
    "doc_to_text",
    "doc_to_choice",
    "doc_to_target",
    "target_delimiter",
    "fewshot_delimiter",
    "gen_prefix",
)
"""The task config fields that make up the prompt template."""


def harness_version() -> str:
    """The installed lm-eval version."""
    return version("lm_eval")


def task_manager(tasks: Sequence[str], include_path: Path | None) -> Any:
    """An lm-eval TaskManager that knows ``tasks``.

    It indexes the package's tasks and those under ``include_path`` and, only when a name is
    not among those, lm-eval's own (indexing all of them takes seconds).

    Raises:
        ParamsError: ``include_path`` is not a folder, no task is given, or a name is no
            task, group or tag lm-eval knows.
    """
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ParamsError("no lm-eval task given; name one (e.g. openrelease_arith_mc).")
    paths = [str(TASKS_DIR)]
    if include_path is not None:
        if not include_path.is_dir():
            raise ParamsError(
                f"lm-eval include path {include_path} is not a folder; "
                "point it at the folder holding your task YAMLs."
            )
        paths.append(str(include_path))
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths)
    for name in tasks:
        if name not in manager.all_tasks:
            raise ParamsError(
                f"lm-eval knows no task {name!r}; check the name (`lm_eval ls tasks`) or "
                "pass the folder of its YAML as the include path."
            )
    return manager


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _config_hash(config: dict[str, Any]) -> str:
    """sha256 of a task config as JSON (other values as text), without where its YAML lies.

    ``metadata.config_source`` is the YAML's path on this machine; the same task found in
    another folder has the same hash.
    """
    cfg = json.loads(json.dumps(config, sort_keys=True, default=str))
    if isinstance(cfg.get("metadata"), dict):
        cfg["metadata"].pop("config_source", None)
    return sha256_json(cfg)


def _task_result(name: str, results: dict[str, Any]) -> HarnessTaskResult:
    config: dict[str, Any] | None = results.get("configs", {}).get(name)
    cfg = config or {}  # a group has no config of its own
    shots = results.get("n-shot", {}).get(name)
    task_version = results.get("versions", {}).get(name)
    return HarnessTaskResult(
        scores={
            k: float(v)
            for k, v in results["results"][name].items()
            if _finite(v) and k != "sample_len"  # sample_len is num_samples
        },
        config_hash=_config_hash(config) if config is not None else None,
        prompt={k: str(cfg[k]) for k in PROMPT_FIELDS if cfg.get(k) is not None},
        output_type=cfg.get("output_type"),
        num_fewshot=shots if isinstance(shots, int) else None,
        num_samples=results.get("n-samples", {}).get(name, {}).get("effective"),
        task_version=str(task_version) if task_version is not None else None,
        dataset=cfg.get("dataset_path"),
        dataset_name=cfg.get("dataset_name"),
        split=cfg.get("test_split") or cfg.get("validation_split"),
    )


def run_harness(model: Any, tokenizer: Any, params: LmEvalParams, *, manager: Any) -> HarnessRecord:
    """Score a loaded model on ``params.tasks`` with lm-eval's ``simple_evaluate``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=params.batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=list(params.tasks),
        num_fewshot=params.num_fewshot,
        limit=params.limit,
        batch_size=params.batch_size,
        task_manager=manager,
        log_samples=False,
        random_seed=params.seed,
        numpy_random_seed=params.seed,
        torch_random_seed=params.seed,
        fewshot_random_seed=params.seed,
    )
    assert results is not None  # None only on non-zero ranks of a distributed run
    return HarnessRecord(
        harness_version=harness_version(),
        seed=params.seed,
        limit=params.limit,
        num_fewshot=params.num_fewshot,
        batch_size=params.batch_size,
        tasks={name: _task_result(name, results) for name in sorted(results["results"])},
    )


def load_for_harness(checkpoint_dir: Path) -> tuple[Any, Any]:
    """Model and tokenizer of a transformers checkpoint folder, loaded as the lm_eval CLI does.

    Raises:
        ArtifactError: The folder holds no transformers checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (checkpoint_dir / "config.json").is_file():
        raise ArtifactError(
            f"{checkpoint_dir} holds no config.json; pass a transformers checkpoint folder.",
            path=str(checkpoint_dir),
        )
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype="auto", use_safetensors=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the lm_eval CLI's default
    model.to(device)  # type: ignore[arg-type]  # transformers types .to() as a wrapper
    model.eval()  # type: ignore[no-untyped-call]
    return model, AutoTokenizer.from_pretrained(checkpoint_dir)


def score_checkpoint(
    checkpoint_dir: Path, params: LmEvalParams, *, include_path: Path | None = None
) -> HarnessRecord:
    """Score one checkpoint folder on ``params.tasks`` (``openrelease eval --checkpoint``)."""
    manager = task_manager(params.tasks, include_path)
    model, tokenizer = load_for_harness(checkpoint_dir)
    return run_harness(model, tokenizer, params, manager=manager)


def chosen_steps(checkpoints: Sequence[CheckpointMeta], params: LmEvalParams) -> set[int]:
    """Steps of a stage's checkpoints that ``params.checkpoints`` selects (the final always)."""
    if not params.tasks or not checkpoints:
        return set()
    steps = [c.step for c in checkpoints]
    match params.checkpoints:
        case "all":
            return set(steps)
        case "every_k":
            return {s for i, s in enumerate(steps, start=1) if i % params.every_k == 0} | {
                steps[-1]
            }
        case "finals":
            return {steps[-1]}


def metric_name(key: str) -> str:
    """lm-eval's ``acc,none`` -> ``acc``; ``exact_match,strict`` -> ``exact_match/strict``."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}/{filt}"


def harness_metrics(record: HarnessRecord) -> dict[str, float]:
    """Flat ``lm_eval/<task>/<metric>`` scores (stderr left out) for MLflow, DVC and plots."""
    out: dict[str, float] = {}
    for task, result in record.tasks.items():
        for key, value in result.scores.items():
            if "_stderr" not in key:
                out[f"lm_eval/{task}/{metric_name(key)}"] = value
    return out


def harness_tags(record: HarnessRecord) -> dict[str, str]:
    """What makes the scores comparable, as tags for the checkpoint's MLflow LoggedModel."""
    tags = {
        "lm_eval.version": record.harness_version,
        "lm_eval.seed": str(record.seed),
        "lm_eval.limit": str(record.limit),
    }
    for task, r in record.tasks.items():
        tags[f"lm_eval.{task}.config_hash"] = r.config_hash or "group"
        tags[f"lm_eval.{task}.num_fewshot"] = str(r.num_fewshot)
        tags[f"lm_eval.{task}.prompt"] = json.dumps(r.prompt, sort_keys=True)[:5000]
    return {re.sub(r"[^\w.\- /:]", "_", k)[:250]: v for k, v in tags.items()}


def harness_fingerprint(params: LmEvalParams, *, project_dir: Path) -> dict[str, Any]:
    """What the scores depend on besides params and weights: the harness and the task files.

    Part of the eval digest, so a new lm-eval or an edited task YAML re-evaluates.
    """
    if not params.tasks:
        return {}
    folders = {"package": TASKS_DIR}
    if params.include_path is not None:
        folders["include_path"] = project_dir / params.include_path
    return {
        "version": harness_version(),
        **{
            name: sha256_tree(
                {k: v for k, v in hash_folder(path).items() if "__pycache__" not in k}
            )
            for name, path in folders.items()
            if path.is_dir()
        },
    }


@dataclass(frozen=True)
class HarnessPlan:
    """Which checkpoints the eval stage scores with lm-eval, and the task manager it uses."""

    params: LmEvalParams
    manager: Any
    steps: dict[str, set[int]]
    """Stage -> the steps of its checkpoints to score."""

    def wants(self, stage: str, step: int) -> bool:
        """True when ``stage``'s checkpoint at ``step`` gets lm-eval scores."""
        return step in self.steps.get(stage, set())

    def score(self, checkpoint_dir: Path) -> HarnessRecord:
        """lm-eval scores of one checkpoint folder."""
        model, tokenizer = load_for_harness(checkpoint_dir)
        return run_harness(model, tokenizer, self.params, manager=self.manager)


def plan_harness(
    params: LmEvalParams, checkpoints: dict[str, Sequence[CheckpointMeta]], *, project_dir: Path
) -> HarnessPlan | None:
    """The lm-eval part of an eval run; None when ``eval.lm_eval.tasks`` is empty.

    Raises:
        ParamsError: The include path or a task name is wrong (raised before any scoring).
    """
    if not params.tasks:
        return None
    include = project_dir / params.include_path if params.include_path else None
    return HarnessPlan(
        params=params,
        manager=task_manager(params.tasks, include),
        steps={stage: chosen_steps(c, params) for stage, c in checkpoints.items()},
    )


def write_harness_outputs(results: Sequence[EvalResult], eval_dir: Path) -> None:
    """``lm_eval.json`` (DVC metrics, keyed by checkpoint digest) and ``lm_eval.csv`` (plots).

    The CSV's ``total_tokens_seen`` counts tokens over all stages so far (the x of the plot).
    """
    offsets = stage_offsets(results)
    scored = [r for r in results if r.lm_eval is not None]
    by_digest: dict[str, Any] = {}
    for r in scored:
        assert r.lm_eval is not None
        by_digest[r.checkpoint_digest] = {
            "stage": r.stage,
            "step": r.step,
            "tokens_seen": r.tokens_seen,
            "checkpoint": r.checkpoint,
            **r.lm_eval.model_dump(mode="json"),
        }
    write_json(eval_dir / EVAL_LM_EVAL, by_digest)
    rows = [(r, harness_metrics(r.lm_eval)) for r in scored if r.lm_eval is not None]
    keys = sorted({k for _, m in rows for k in m})
    header = ["stage", "step", "tokens_seen", "total_tokens_seen", "checkpoint_digest", *keys]
    lines = [",".join(header)]
    for r, m in rows:
        total = offsets[r.stage] + r.tokens_seen
        cells = [r.stage, str(r.step), str(r.tokens_seen), str(total), r.checkpoint_digest]
        lines.append(",".join(cells + [f"{m[k]:.6g}" if k in m else "" for k in keys]))
    write_text_atomic(eval_dir / EVAL_LM_EVAL_CURVE, "\n".join(lines) + "\n")


def stage_offsets(results: Sequence[EvalResult]) -> dict[str, int]:
    """Stage -> tokens seen by the stages before it (their last checkpoints' counts).

    Stages follow the order of ``results`` (the pipeline's order, as the eval stage lists them).
    """
    last: dict[str, int] = {}
    for r in results:
        last[r.stage] = max(last.get(r.stage, 0), r.tokens_seen)
    offsets: dict[str, int] = {}
    total = 0
    for stage, tokens in last.items():
        offsets[stage] = total
        total += tokens
    return offsets
