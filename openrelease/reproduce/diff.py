"""Compare a replayed checkpoint with the recorded one: sha256 per file, |delta| per tensor, loss.

`openrelease.reproduce.replay` writes the replayed checkpoint; `openrelease.reproduce.run` reports
the `CheckpointDiff` (a `ReproduceReport` is one).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError, safe_open

from openrelease.digest import sha256_file
from openrelease.layout import CHECKPOINT_META, WEIGHTS, Workspace
from openrelease.manifest import CheckpointMeta, read_model
from openrelease.params import StageName
from openrelease.safeio import loads_json, read_regular


class FileCheck(BaseModel):
    """One file of the checkpoint: its recorded, found and replayed sha256 (None: absent)."""

    model_config = ConfigDict(frozen=True)
    path: str
    recorded: str | None
    """In the recorded meta.json."""
    found: str | None
    """Of the recorded file as it is on disk now."""
    replayed: str | None

    @property
    def same(self) -> bool:
        """All three agree."""
        return self.recorded is not None and self.recorded == self.found == self.replayed


class TensorDrift(BaseModel):
    """One weight tensor of the replayed checkpoint against the recorded one."""

    model_config = ConfigDict(frozen=True)
    name: str
    max_abs_delta: float | None
    """None when the tensors cannot be compared (see ``note``)."""
    note: str = ""


class LossPoint(BaseModel):
    """One replayed step's training loss and the recorded one (None: not recorded)."""

    model_config = ConfigDict(frozen=True)
    step: int
    recorded: float | None
    replayed: float | None


class CheckpointDiff(BaseModel):
    """A replayed checkpoint against the recorded one."""

    model_config = ConfigDict(frozen=True)
    identical: bool
    """Every file has the recorded sha256, in the replay and on disk."""
    recorded_digest: str
    replayed_digest: str
    files: tuple[FileCheck, ...]
    drift: tuple[TensorDrift, ...]
    """Per weight tensor; empty when the weights are identical."""
    max_abs_delta: float | None
    """0.0 when identical; None when some tensor could not be compared (see ``drift``)."""
    losses: tuple[LossPoint, ...]
    max_loss_delta: float | None
    """None when no replayed step has a recorded loss."""
    meta_differences: tuple[str, ...]
    """meta.json fields (besides the files) whose replayed value differs from the record."""
    notes: tuple[str, ...]

    def weights(self) -> FileCheck:
        """The model.safetensors row of ``files``."""
        return next(f for f in self.files if f.path == WEIGHTS)


def _files(
    recorded: CheckpointMeta, recorded_dir: Path, replayed: CheckpointMeta
) -> tuple[FileCheck, ...]:
    want = {f.path: f.sha256 for f in recorded.files}
    got = {f.path: f.sha256 for f in replayed.files}
    rows = []
    for rel in sorted(want.keys() | got.keys()):
        path = recorded_dir / rel
        found = sha256_file(path) if path.is_file() else None
        rows.append(FileCheck(path=rel, recorded=want.get(rel), found=found, replayed=got.get(rel)))
    return tuple(rows)


def _tensor_drift(recorded: Path, replayed: Path) -> list[TensorDrift]:
    """The largest |replayed - recorded| of every tensor (in float64)."""
    try:
        with (
            safe_open(str(recorded), framework="pt") as a,
            safe_open(str(replayed), framework="pt") as b,
        ):
            names_a, names_b = set(a.keys()), set(b.keys())
            out = []
            for name in sorted(names_a | names_b):
                if name not in names_a or name not in names_b:
                    where = "replay" if name in names_b else "record"
                    out.append(TensorDrift(name=name, max_abs_delta=None, note=f"only in {where}"))
                    continue
                x, y = a.get_tensor(name), b.get_tensor(name)
                if x.shape != y.shape or x.dtype != y.dtype:
                    note = f"recorded {x.dtype}{list(x.shape)}, replayed {y.dtype}{list(y.shape)}"
                    out.append(TensorDrift(name=name, max_abs_delta=None, note=note))
                    continue
                delta = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
                out.append(TensorDrift(name=name, max_abs_delta=delta))
            return out
    except (SafetensorError, OSError) as exc:
        return [TensorDrift(name="*", max_abs_delta=None, note=f"cannot read weights: {exc}")]


def _loss_by_step(path: Path) -> dict[int, float]:
    if not path.is_file():
        return {}
    text = read_regular(path, max_bytes=MAX_METRICS_BYTES)
    rows = [loads_json(line, where=str(path)) for line in text.splitlines() if line.strip()]
    return {
        int(r["step"]): float(r["loss"])
        for r in rows
        if isinstance(r, dict) and _number(r.get("step")) and _number(r.get("loss"))
    }


MAX_METRICS_BYTES = 256 << 20


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _max_delta(drift: list[TensorDrift]) -> float | None:
    if any(d.max_abs_delta is None for d in drift):
        return None
    return max((d.max_abs_delta or 0.0 for d in drift), default=0.0)


def diff_checkpoints(
    recorded_dir: Path,
    recorded_metrics: Path,
    *,
    root: Path,
    stage: StageName,
    steps: tuple[int, int],
) -> CheckpointDiff:
    """Compare the replayed checkpoint in ``root`` with the recorded one at ``recorded_dir``.

    Args:
        recorded_dir: The recorded checkpoint folder (meta.json and files).
        recorded_metrics: The recorded metrics.jsonl (may be missing).
        root: The scratch workspace after the replay.
        stage: The replayed stage.
        steps: The first and last replayed step.
    """
    scratch = Workspace(root)
    recorded = read_model(recorded_dir / CHECKPOINT_META, CheckpointMeta)
    folder = scratch.checkpoint(stage, steps[1])
    replayed = read_model(folder / CHECKPOINT_META, CheckpointMeta)
    files = _files(recorded, recorded_dir, replayed)
    weights = next(f for f in files if f.path == WEIGHTS)
    drift = []
    if not weights.same:
        drift = _tensor_drift(recorded_dir / WEIGHTS, folder / WEIGHTS)
    want = _loss_by_step(recorded_metrics)
    got = _loss_by_step(scratch.metrics(stage))
    losses = tuple(
        LossPoint(step=s, recorded=want.get(s), replayed=got.get(s))
        for s in range(steps[0], steps[1] + 1)
    )
    deltas = [
        abs(p.recorded - p.replayed)
        for p in losses
        if p.recorded is not None and p.replayed is not None
    ]
    skip = {"files", "checkpoint_digest"}
    a, b = recorded.model_dump(exclude=skip), replayed.model_dump(exclude=skip)
    return CheckpointDiff(
        identical=all(f.same for f in files),
        recorded_digest=recorded.checkpoint_digest,
        replayed_digest=replayed.checkpoint_digest,
        files=files,
        drift=tuple(drift),
        max_abs_delta=_max_delta(drift),
        losses=losses,
        max_loss_delta=max(deltas) if deltas else None,
        meta_differences=tuple(k for k in a if a[k] != b[k]),
        notes=tuple(
            f"recorded {f.path} does not match its meta.json (changed after it was written)"
            for f in files
            if f.found != f.recorded
        ),
    )
