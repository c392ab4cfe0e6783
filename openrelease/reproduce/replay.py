"""Replay a stretch of a recorded stage in a scratch workspace, and diff the checkpoint it writes.

`openrelease.reproduce.run` decides what to replay and from where; this module builds the scratch
workspace, runs the stage (here, or under torchrun as ``-m openrelease.reproduce.replay``) and
compares the result with the recorded checkpoint: sha256 per file, max |delta| per tensor, loss.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError, safe_open

from openrelease.digest import sha256_file
from openrelease.errors import ArtifactError, OpenReleaseError
from openrelease.manifest import CheckpointMeta, StageManifest, dump_json, read_model, write_json
from openrelease.params import STAGES, ComputeParams, PipelineParams, StageName, load_params
from openrelease.train import checkpoint as ckpt
from openrelease.train import run_stage
from openrelease.train.distill import TEACHER_FILE, TRACES_FILE
from openrelease.train.loop import TrainReport


class ReplayError(OpenReleaseError):
    """The replay itself failed; the message carries the end of its log."""


@dataclass(frozen=True)
class Scratch:
    """What a scratch workspace holds: links to read-only inputs, copies, and written files.

    Keys are paths relative to the workspace root. Nothing the replay writes reaches a linked
    path: it writes only under ``artifacts/<stage>/`` of the stage it replays.
    """

    links: dict[str, Path] = field(default_factory=dict)
    """Symlinked files and folders (data, the initial checkpoint, a teacher)."""
    copies: dict[str, Path] = field(default_factory=dict)
    """Copied files and folders (the training state, which the replay may prune)."""
    texts: dict[str, str] = field(default_factory=dict)
    """Written files (params.yaml, the previous stage's manifest)."""


def build_scratch(root: Path, scratch: Scratch) -> None:
    """Create the links, copies and files of ``scratch`` under the empty folder ``root``."""
    for rel, src in scratch.links.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(src.resolve(), target_is_directory=src.is_dir())
    for rel, src in scratch.copies.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, root / rel)
        else:
            shutil.copyfile(src, root / rel)
    for rel, text in scratch.texts.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")


SCRATCH_DATA = "artifacts/data"
"""Where a scratch workspace links the data."""


def scratch_for(
    stage: StageName,
    params: PipelineParams,
    *,
    data_dir: Path,
    init: tuple[StageName, Path, CheckpointMeta] | None,
    state: tuple[int, Path] | None,
    teacher_root: Path | None,
) -> tuple[Scratch, PipelineParams]:
    """The scratch workspace of a replay, and the params it runs with (data at SCRATCH_DATA).

    Args:
        stage: The stage to replay.
        params: The recorded run's params.
        data_dir: The data stage's folder.
        init: The previous stage, and the folder and meta of its checkpoint the stage starts from.
        state: The step and folder of the training state to resume (None: from step 0).
        teacher_root: The workspace whose artifacts/distill holds the traces of a trace-file
            or model teacher (None: a bundle, which carries only data-teacher traces).

    Raises:
        ArtifactError: A distill replay needs traces that ``teacher_root`` cannot give.
    """
    scratch = Scratch(links={SCRATCH_DATA: data_dir})
    data = params.data.model_copy(update={"out_dir": SCRATCH_DATA})
    params = params.model_copy(update={"data": data})
    if init is not None:
        prev, folder, meta = init
        rel = f"artifacts/{prev}/checkpoints/step-{meta.step}"
        scratch.links[rel] = folder
        manifest = StageManifest(
            stage=prev, final_step=meta.step, final_checkpoint=rel, checkpoints=(meta,)
        )
        scratch.texts[f"artifacts/{prev}/manifest.json"] = dump_json(
            manifest.model_dump(mode="json")
        )
    if state is not None:
        scratch.copies[f"artifacts/{stage}/states/step-{state[0]}"] = state[1]
    teacher = params.distill.teacher
    if stage == "distill" and teacher.kind != "data":
        if teacher_root is None:
            raise ArtifactError(
                f"this bundle does not carry the traces of its distill {teacher.kind} teacher; "
                "replay distill from the workspace."
            )
        for name in (TRACES_FILE, TEACHER_FILE):
            if (recorded := ckpt.stage_dir(teacher_root, "distill") / name).is_file():
                scratch.copies[f"artifacts/distill/{name}"] = recorded
        if not Path(str(teacher.path)).is_absolute():
            scratch.links[str(teacher.path)] = teacher_root / str(teacher.path)
    dumped = params.model_dump(mode="json")
    scratch.texts["params.yaml"] = yaml.safe_dump(dumped, sort_keys=False)
    return scratch, params


def device_name(env: Mapping[str, str], compute: ComputeParams) -> str:
    """``cuda (<gpu>)`` or ``cpu (<machine>)`` for a run with environment ``env``."""
    if compute.device != "cpu" and "gpu" in env:
        return f"cuda ({env['gpu']})"
    return f"cpu ({env['machine']})" if "machine" in env else "unknown"


def local_env() -> dict[str, str]:
    """This machine's ``machine`` and ``gpu`` (when CUDA is visible), as record.json has them."""
    env = {"machine": platform.machine()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _package_root() -> Path:
    return Path(__file__).resolve().parent.parent.parent


def run_replay(
    root: Path, stage: StageName, params: PipelineParams, *, stop_at_step: int, world_size: int
) -> TrainReport:
    """Resume ``stage`` in the scratch workspace ``root`` and run it to ``stop_at_step``.

    One process runs here; more run under ``python -m torch.distributed.run --standalone``
    with ``root/params.yaml`` (which must equal ``params``), on this machine.

    Raises:
        ReplayError: The torchrun job failed (the message ends with its log).
    """
    if world_size == 1:
        return run_stage(stage, params, project_dir=root, stop_at_step=stop_at_step, record=False)
    report_path, log_path = root / "replay-report.json", root / "replay.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(world_size), "-m", "openrelease.reproduce.replay"]
    cmd += [stage, str(root), str(stop_at_step), str(report_path)]
    path = [str(_package_root()), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    with log_path.open("wb") as log:
        proc = subprocess.run(cmd, cwd=root, env=env, stdout=log, stderr=log, check=False)
    if proc.returncode != 0 or not report_path.is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise ReplayError(
            f"the {world_size}-process replay of {stage} failed (exit {proc.returncode}); "
            f"its log ends:\n{tail}"
        )
    return read_model(report_path, TrainReport)


# --------------------------------------------------------------------------- the diff


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
        return next(f for f in self.files if f.path == ckpt.WEIGHTS_FILE)


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
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line)
    return {int(r["step"]): float(r["loss"]) for r in rows}


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
    recorded = read_model(recorded_dir / ckpt.META_FILE, CheckpointMeta)
    folder = ckpt.step_dir(ckpt.stage_dir(root, stage) / "checkpoints", steps[1])
    replayed = read_model(folder / ckpt.META_FILE, CheckpointMeta)
    files = _files(recorded, recorded_dir, replayed)
    weights = next(f for f in files if f.path == ckpt.WEIGHTS_FILE)
    drift = []
    if not weights.same:
        drift = _tensor_drift(recorded_dir / ckpt.WEIGHTS_FILE, folder / ckpt.WEIGHTS_FILE)
    want = _loss_by_step(recorded_metrics)
    got = _loss_by_step(ckpt.stage_dir(root, stage) / "metrics.jsonl")
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


# --------------------------------------------------------------------------- worker entry


def main(argv: list[str]) -> None:
    """Worker: STAGE ROOT STOP_AT_STEP REPORT_JSON; rank 0 writes the `TrainReport` there."""
    stage_arg, root_arg, stop_arg, report_arg = argv
    stage = next(s for s in STAGES if s == stage_arg)
    root = Path(root_arg)
    params = load_params(root / "params.yaml")
    report = run_stage(stage, params, project_dir=root, stop_at_step=int(stop_arg), record=False)
    if report.rank == 0:
        write_json(Path(report_arg), report)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
