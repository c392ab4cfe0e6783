"""What `openrelease launch`'s recorder does after a stage, for tests that train in-process."""

from __future__ import annotations

from pathlib import Path

from openrelease.layout import Workspace
from openrelease.manifest import StageRecord, read_model
from openrelease.record.recorder import send
from openrelease.record.tracking import tracking_uri


def send_stage(project: Path, stage: str) -> int:
    """Send ``stage``'s journal to MLflow and put the run ids in its record.json."""
    path = Workspace(project).record(stage)
    record = read_model(path, StageRecord)
    return send(project, record.run_key, tracking_uri=tracking_uri(project), record_path=path)
