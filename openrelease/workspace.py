"""What a project workspace holds: each pipeline stage's outputs, found through their manifests."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from openrelease.manifest import DataManifest, StageManifest, read_model
from openrelease.params import STAGES, PipelineParams


class StageStatus(BaseModel):
    """One stage: whether its outputs exist, where, and a one-line summary."""

    model_config = ConfigDict(frozen=True)
    stage: str
    done: bool
    path: str
    summary: str


class WorkspaceReport(BaseModel):
    """Every pipeline stage of a workspace, in pipeline order."""

    model_config = ConfigDict(frozen=True)
    project_dir: str
    stages: tuple[StageStatus, ...]


def _data_status(project_dir: Path, params: PipelineParams) -> StageStatus:
    path = project_dir / params.data.out_dir
    manifest_path = path / "manifest.json"
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
    rel = f"artifacts/{stage}"
    manifest_path = project_dir / rel / "manifest.json"
    if not manifest_path.exists():
        return StageStatus(stage=stage, done=False, path=rel, summary="not run")
    m = read_model(manifest_path, StageManifest)
    last = m.checkpoints[-1] if m.checkpoints else None
    loss = f", final loss {last.loss:.4f}" if last is not None and last.loss is not None else ""
    return StageStatus(
        stage=stage,
        done=True,
        path=rel,
        summary=f"{len(m.checkpoints)} checkpoints to step {m.final_step}{loss}; "
        f"final {m.final_checkpoint}",
    )


def describe_workspace(project_dir: Path, params: PipelineParams) -> WorkspaceReport:
    """Report which stages of the pipeline have outputs in ``project_dir``."""
    stages = [_data_status(project_dir, params)]
    stages += [_train_status(project_dir, stage) for stage in STAGES]
    return WorkspaceReport(project_dir=str(project_dir), stages=tuple(stages))
