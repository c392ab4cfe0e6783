"""What a project workspace holds: each pipeline stage's outputs, found through their manifests."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from openrelease.layout import (
    AUDIT,
    EVAL_METRICS,
    EVAL_PLOTS,
    EVAL_STAGE,
    RELEASE_DIR,
    STAGE_MANIFEST,
    Bundle,
    Workspace,
    checkpoint_rel,
    stage_rel,
    step_of,
)
from openrelease.manifest import BundleManifest, DataManifest, StageManifest, read_model
from openrelease.params import PipelineParams
from openrelease.record.tracking import ui_uri
from openrelease.safeio import read_json_file


class StageStatus(BaseModel):
    """One stage: whether its outputs exist, where, and a one-line summary."""

    model_config = ConfigDict(frozen=True)
    stage: str
    done: bool
    path: str
    summary: str


class WorkspaceReport(BaseModel):
    """Every pipeline stage of a workspace, in pipeline order, and where to look next."""

    model_config = ConfigDict(frozen=True)
    project_dir: str
    stages: tuple[StageStatus, ...]
    final_metrics: dict[str, dict[str, float]]
    """Eval metrics of each stage's final checkpoint (artifacts/eval/metrics.json)."""
    plots: tuple[str, ...]
    """PNG plots written by the eval stage."""
    tracking_uri: str
    """Where the MLflow record is; open it from the project folder with
    ``mlflow ui --backend-store-uri <uri>``."""


def _data_status(project_dir: Path, params: PipelineParams) -> StageStatus:
    path = project_dir / params.data.out_dir
    manifest_path = path / STAGE_MANIFEST
    if not manifest_path.exists():
        return StageStatus(stage="data", done=False, path=params.data.out_dir, summary="not run")
    m = read_model(manifest_path, DataManifest)
    sets = ", ".join(f"{k} {v.num_records}" for k, v in sorted(m.datasets.items()))
    return StageStatus(
        stage="data",
        done=True,
        path=params.data.out_dir,
        summary=f"{m.num_pretrain_seqs} sequences / {m.num_pretrain_tokens} tokens, "
        f"vocab {m.vocab_size}; {sets}; {m.data_digest[:19]}",
    )


def _train_status(project_dir: Path, stage: str) -> StageStatus:
    rel = stage_rel(stage)
    manifest_path = project_dir / rel / STAGE_MANIFEST
    if not manifest_path.exists():
        return StageStatus(stage=stage, done=False, path=rel, summary="not run")
    m = read_model(manifest_path, StageManifest)
    missing = [
        checkpoint_rel(stage, c.step)
        for c in m.checkpoints
        if not all(
            (project_dir / checkpoint_rel(stage, c.step) / f.path).is_file() for f in c.files
        )
    ]
    if missing or not m.checkpoints:
        what = f"{len(missing)} of {len(m.checkpoints)} checkpoints missing (e.g. {missing[0]})"
        return StageStatus(
            stage=stage,
            done=False,
            path=rel,
            summary=f"{what if missing else 'no checkpoints'}; `dvc pull` or `dvc repro {stage}`",
        )
    last = m.checkpoints[-1]
    loss = f", final loss {last.loss:.4f}" if last.loss is not None else ""
    return StageStatus(
        stage=stage,
        done=True,
        path=rel,
        summary=f"{len(m.checkpoints)} checkpoints to step {m.final_step}{loss}; "
        f"final {m.final_checkpoint}",
    )


def _eval_status(project_dir: Path) -> tuple[StageStatus, dict[str, dict[str, float]]]:
    rel = stage_rel(EVAL_STAGE)
    path = Workspace(project_dir).eval_dir / EVAL_METRICS
    if not path.is_file():
        return StageStatus(stage="eval", done=False, path=rel, summary="not run"), {}
    metrics: dict[str, dict[str, float]] = read_json_file(path)
    results = Workspace(project_dir).eval_results.rglob("*.json")
    num = sum(1 for p in results if step_of(p.stem) is not None)
    summary = f"{num} checkpoints evaluated; final metrics of {len(metrics)} stages"
    return StageStatus(stage="eval", done=True, path=rel, summary=summary), metrics


def _bundle_status(project_dir: Path) -> StageStatus:
    path = Bundle(Workspace(project_dir).release).manifest
    if not path.is_file():
        return StageStatus(stage="bundle", done=False, path=RELEASE_DIR, summary="not run")
    m = read_model(path, BundleManifest)
    size = sum(f.size for f in m.files)
    return StageStatus(
        stage="bundle",
        done=True,
        path=RELEASE_DIR,
        summary=f"{len(m.files)} files, {size / 1e6:.1f} MB; {m.bundle_digest[:19]}",
    )


def _audit_status(project_dir: Path) -> StageStatus:
    path = Workspace(project_dir).audit
    if not path.is_file():
        return StageStatus(stage="audit", done=False, path=AUDIT, summary="not run")
    report = read_json_file(path)
    names = {1: "Class I", 2: "Class II", 3: "Class III"}
    label = names.get(report.get("mof_class"), "unclassified")
    return StageStatus(stage="audit", done=True, path=AUDIT, summary=f"MOF {label}")


def describe_workspace(project_dir: Path, params: PipelineParams) -> WorkspaceReport:
    """Report which stages of the pipeline have outputs in ``project_dir``."""
    stages = [_data_status(project_dir, params)]
    stages += [_train_status(project_dir, stage) for stage in params.train_stages]
    eval_status, metrics = _eval_status(project_dir)
    stages += [eval_status, _bundle_status(project_dir), _audit_status(project_dir)]
    plot_dir = Workspace(project_dir).eval_dir / EVAL_PLOTS
    plots = sorted(p.as_posix() for p in plot_dir.glob("*.png"))
    return WorkspaceReport(
        project_dir=str(project_dir),
        stages=tuple(stages),
        final_metrics=metrics,
        plots=tuple(plots),
        tracking_uri=ui_uri(project_dir),
    )
