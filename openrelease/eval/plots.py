"""Plots people would rather look at than read: loss, eval curves, lm-eval scores, GRPO reward/KL.

Works from a workspace (artifacts/) or from a bundle (logs/ and evals/); writes PNG and SVG.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from openrelease.errors import ArtifactError, ParamsError
from openrelease.eval.harness import metric_name
from openrelease.layout import EVAL_PLOTS, EVAL_RESULTS, METRICS, Bundle, BundleSection, Workspace
from openrelease.manifest import EvalResult, validate_model, write_bytes_atomic
from openrelease.params import STAGES
from openrelease.safeio import loads_json, read_regular

_STAGE_COLORS = {
    "pretrain": "#1f77b4",
    "sft": "#ff7f0e",
    "dpo": "#9467bd",
    "distill": "#2ca02c",
    "grpo": "#d62728",
}


MAX_METRICS_BYTES = 256 << 20
MAX_RESULT_BYTES = 1 << 20


def _input_file(root: Path, path: Path, *, max_bytes: int) -> bytes:
    """A file of the input ``root``: regular, capped, and not a symlink leading out of it."""
    if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
        raise ArtifactError(f"{path} is a symlink out of {root}; it was not read.", path=str(path))
    return read_regular(path, max_bytes=max_bytes)


def _metrics_file(root: Path, stage: str) -> Path | None:
    for candidate in (
        Workspace(root).metrics(stage),
        Bundle(root).log(stage, METRICS),
    ):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _stages_in(root: Path) -> list[str]:
    """Training stages with a metrics.jsonl: the default chain's order, then the others."""
    found = {
        p.parent.name
        for parent in (Workspace(root).artifacts, Bundle(root).root / BundleSection.LOGS)
        for p in parent.glob(f"*/{METRICS}")
    }
    return [s for s in STAGES if s in found] + sorted(found - set(STAGES))


def read_training_metrics(root: Path) -> dict[str, list[dict[str, float]]]:
    """Per-stage rows of the trainer's metrics.jsonl (workspace or bundle layout).

    Rows without a numeric ``step`` are skipped, and so are non-numeric values.

    Raises:
        ArtifactError: A metrics file is not a regular file in ``root``, too big, or bad JSON.
    """
    out: dict[str, list[dict[str, float]]] = {}
    for stage in _stages_in(root):
        path = _metrics_file(root, stage)
        if path is None:
            continue
        text = _input_file(root, path, max_bytes=MAX_METRICS_BYTES)
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                row = loads_json(line, where=f"{path}:{number}")
                if isinstance(row, dict) and _is_number(row.get("step")):
                    rows.append({k: v for k, v in row.items() if _is_number(v)})
        out[stage] = rows
    return out


def read_eval_results(root: Path) -> list[dict[str, Any]]:
    """Every eval result JSON (workspace or bundle layout), each checked against its schema.

    Raises:
        ArtifactError: A result is not a regular file in ``root``, too big, bad JSON or off-schema.
    """
    for base in (Workspace(root).eval_results, Bundle(root).eval_dir / EVAL_RESULTS):
        if base.is_dir() and not base.is_symlink():
            results = []
            for p in sorted(base.rglob("*.json")):
                raw = loads_json(_input_file(root, p, max_bytes=MAX_RESULT_BYTES), where=str(p))
                results.append(validate_model(raw, EvalResult, where=str(p)).model_dump())
            return results
    return []


def default_out_dir(root: Path) -> Path:
    """Where `openrelease plot` writes by default.

    A workspace: its plot folder. A bundle must stay as its manifest lists it, so ``plots/`` in
    the current folder.
    """
    if Bundle(root).manifest.is_file():
        return Path(EVAL_PLOTS)
    return Workspace(root).eval_dir / EVAL_PLOTS


def check_out_dir(root: Path, out_dir: Path) -> None:
    """Refuse an output folder inside a bundle being read (writing there would change it).

    Raises:
        ParamsError: Naming the folder and what to pass instead.
    """
    if Bundle(root).manifest.is_file() and out_dir.resolve().is_relative_to(root.resolve()):
        raise ParamsError(
            f"--out {out_dir} is inside the bundle {root}, which plotting only reads; "
            "choose a folder outside it."
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ParamsError(f"--out {out_dir} is not a folder; choose a folder.")


def _save(fig: Any, out_dir: Path, name: str) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    for ext in ("png", "svg"):
        buffer = io.BytesIO()  # in memory: no temporary path a planted symlink could redirect
        fig.savefig(
            buffer,
            format=ext,
            dpi=110,
            bbox_inches="tight",
            metadata={"Date": None} if ext == "svg" else {"Software": None},
        )
        write_bytes_atomic(out_dir / f"{name}.{ext}", buffer.getvalue())
        paths.append(out_dir / f"{name}.{ext}")
    plt.close(fig)
    return paths


def _loss_plot(metrics: dict[str, list[dict[str, float]]], out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    offset = 0.0
    for stage, rows in metrics.items():
        rows = [r for r in rows if "loss" in r]
        if not rows:
            continue
        xs = [offset + float(r.get("tokens_seen", r.get("tokens", r["step"]))) for r in rows]
        ax.plot(
            xs,
            [r["loss"] for r in rows],
            label=stage,
            color=_STAGE_COLORS.get(stage),
            linewidth=1.2,
        )
        offset = xs[-1]
    ax.set_xlabel("tokens seen (cumulative over stages)")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss across all stages")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out_dir, "training_loss")


def _eval_plot(results: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    keys = sorted({k for r in results for k in r["metrics"]})
    if not keys:
        return []
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for stage in dict.fromkeys(r["stage"] for r in results):
            rows = sorted(
                (r for r in results if r["stage"] == stage and key in r["metrics"]),
                key=lambda r: r["step"],
            )
            if rows:
                ax.plot(
                    [r["step"] for r in rows],
                    [r["metrics"][key] for r in rows],
                    marker="o",
                    label=stage,
                    color=_STAGE_COLORS.get(stage),
                )
        ax.set_title(key)
        ax.set_xlabel("checkpoint step")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("Eval metrics per checkpoint")
    return _save(fig, out_dir, "eval_metrics")


def _main_scores(record: dict[str, Any]) -> dict[str, tuple[str, float]]:
    """Task -> its first score that is not a stderr, as (lm-eval key, value)."""
    out: dict[str, tuple[str, float]] = {}
    for task, result in record["tasks"].items():
        keys = [k for k in result["scores"] if "_stderr" not in k]
        if keys:
            out[task] = (keys[0], result["scores"][keys[0]])
    return out


def _harness_plot(results: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """lm-eval's main score of each task against tokens seen over all stages."""
    import matplotlib.pyplot as plt

    scored = [(r, _main_scores(r["lm_eval"])) for r in results if r.get("lm_eval")]
    metrics = {t: key for _, main in scored for t, (key, _) in main.items()}
    if not metrics:
        return []
    last: dict[str, int] = {}
    for r in results:
        last[r["stage"]] = max(last.get(r["stage"], 0), r["tokens_seen"])
    order = list(last)  # stages in the order the results list them (the pipeline's order)
    offset, offsets = 0, {}
    for stage in order:
        offsets[stage], offset = offset, offset + last[stage]
    tasks = sorted(metrics)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for stage in order:
            pts = sorted(
                (offsets[stage] + r["tokens_seen"], main[task][1])
                for r, main in scored
                if r["stage"] == stage and task in main
            )
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="o",
                    label=stage,
                    color=_STAGE_COLORS.get(stage),
                )
        ax.set_title(f"{task} ({metric_name(metrics[task])})", fontsize=9)
        ax.set_xlabel("tokens seen (cumulative over stages)")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("lm-evaluation-harness scores per checkpoint", y=1.02)
    return _save(fig, out_dir, "lm_eval_scores")


def _grpo_plot(rows: list[dict[str, float]], out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    keys = [k for k in ("reward", "kl") if any(k in r for r in rows)]
    if not keys:
        return []
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=_STAGE_COLORS["grpo"])
        ax.set_title(f"GRPO {key}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _save(fig, out_dir, "grpo_reward_kl")


def write_plots(
    root: Path, *, results: list[dict[str, Any]] | None = None, out_dir: Path
) -> list[Path]:
    """Write every plot the data allows into ``out_dir``; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "openrelease"
    check_out_dir(root, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = read_training_metrics(root)
    paths: list[Path] = []
    if metrics:
        paths += _loss_plot(metrics, out_dir)
    evals = results if results is not None else read_eval_results(root)
    if evals:
        paths += _eval_plot(evals, out_dir)
        paths += _harness_plot(evals, out_dir)
    rl = next((rows for rows in metrics.values() if any("reward" in r for r in rows)), [])
    if rl:
        paths += _grpo_plot(rl, out_dir)
    return paths
