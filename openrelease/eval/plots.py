"""Plots people would rather look at than read: loss across stages, eval curves, GRPO reward/KL.

Works from a workspace (artifacts/) or from a bundle (logs/ and evals/); writes PNG and SVG.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from openrelease.layout import EVAL_RESULTS, METRICS, Bundle, Workspace
from openrelease.params import STAGES

_STAGE_COLORS = {"pretrain": "#1f77b4", "sft": "#ff7f0e", "distill": "#2ca02c", "grpo": "#d62728"}


def _metrics_file(root: Path, stage: str) -> Path | None:
    for candidate in (
        Workspace(root).metrics(stage),
        Bundle(root).log(stage, METRICS),
    ):
        if candidate.exists():
            return candidate
    return None


def read_training_metrics(root: Path) -> dict[str, list[dict[str, float]]]:
    """Per-stage rows of the trainer's metrics.jsonl (workspace or bundle layout)."""
    out: dict[str, list[dict[str, float]]] = {}
    for stage in STAGES:
        path = _metrics_file(root, stage)
        if path is None:
            continue
        rows = [
            json.loads(line)
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        out[stage] = [r for r in rows if isinstance(r, dict) and "step" in r]
    return out


def read_eval_results(root: Path) -> list[dict[str, Any]]:
    """Every eval result JSON (workspace or bundle layout)."""
    for base in (Workspace(root).eval_results, Bundle(root).eval_dir / EVAL_RESULTS):
        if base.exists():
            return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(base.rglob("*.json"))]
    return []


def _save(fig: Any, out_dir: Path, name: str) -> list[Path]:
    import matplotlib.pyplot as plt

    from openrelease.manifest import write_bytes_atomic

    paths = []
    for ext in ("png", "svg"):
        tmp = out_dir / f".{name}.{ext}.part"
        fig.savefig(
            tmp,
            format=ext,
            dpi=110,
            bbox_inches="tight",
            metadata={"Date": None} if ext == "svg" else {"Software": None},
        )
        write_bytes_atomic(out_dir / f"{name}.{ext}", tmp.read_bytes())
        tmp.unlink()
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
        for stage in STAGES:
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
                    color=_STAGE_COLORS[stage],
                )
        ax.set_title(key)
        ax.set_xlabel("checkpoint step")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("Eval metrics per checkpoint")
    return _save(fig, out_dir, "eval_metrics")


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
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = read_training_metrics(root)
    paths: list[Path] = []
    if metrics:
        paths += _loss_plot(metrics, out_dir)
    evals = results if results is not None else read_eval_results(root)
    if evals:
        paths += _eval_plot(evals, out_dir)
    if metrics.get("grpo"):
        paths += _grpo_plot(metrics["grpo"], out_dir)
    return paths
