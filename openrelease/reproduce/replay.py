"""Replay a stretch of a recorded stage in a scratch workspace.

`openrelease.reproduce.run` decides what to replay and from where; this module builds the scratch
workspace and runs the stage in it: here for one process, else under torchrun with this module
as the worker on every rank (`main`). `openrelease.reproduce.diff` compares what it writes.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from openrelease.errors import ArtifactError, OpenReleaseError
from openrelease.layout import (
    PARAMS,
    STAGE_MANIFEST,
    Workspace,
    checkpoint_rel,
    stage_rel,
    state_rel,
)
from openrelease.manifest import (
    CheckpointMeta,
    PinnedSource,
    StageManifest,
    dump_json,
    read_json,
    read_model,
    write_json,
    write_text_atomic,
)
from openrelease.params import ComputeParams, DistillParams, PipelineParams, StageName, load_params
from openrelease.record.fingerprint import fingerprint
from openrelease.train import TrainReport, run_stage
from openrelease.train.distill import TEACHER_FILE, TRACES_FILE
from openrelease.train.launch import launch_env, launcher_argv
from openrelease.verify.untrusted import unsafe_path_reason


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


SCRATCH_DATA = stage_rel("data")
"""Where a scratch workspace links the data."""


def scratch_for(
    stage: StageName,
    params: PipelineParams,
    *,
    data_dir: Path,
    init: tuple[StageName, Path, CheckpointMeta] | None,
    state: tuple[int, Path] | None,
    teacher_root: Path | None,
    base: tuple[PinnedSource, Path] | None = None,
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
        base: The Hub base model the stage starts from and a folder holding its files (a
            bundle's base_model/, a workspace's Hub cache): linked, file by file, into the
            scratch workspace's Hub cache with its pin, so the replay takes them from there
            (each hashed again against the pin) instead of the Hub.

    Raises:
        ArtifactError: A distill replay needs traces that ``teacher_root`` cannot give.
    """
    scratch = Scratch(links={SCRATCH_DATA: data_dir})
    data = params.data.model_copy(update={"out_dir": SCRATCH_DATA})
    params = params.model_copy(update={"data": data})
    if init is not None:
        prev, folder, meta = init
        rel = checkpoint_rel(prev, meta.step)
        scratch.links[rel] = folder
        manifest = StageManifest(
            stage=prev, final_step=meta.step, final_checkpoint=rel, checkpoints=(meta,)
        )
        scratch.texts[f"{stage_rel(prev)}/{STAGE_MANIFEST}"] = dump_json(
            manifest.model_dump(mode="json")
        )
    if state is not None:
        scratch.copies[state_rel(stage, state[0])] = state[1]
    if base is not None:
        _link_base_model(scratch, *base)
    section = params.stage(stage)
    teacher = section.teacher if isinstance(section, DistillParams) else None
    if teacher is not None and teacher.kind != "data":
        if teacher_root is None:
            raise ArtifactError(
                f"this bundle does not carry the traces of its distill {teacher.kind} teacher; "
                "replay distill from the workspace."
            )
        for name in (TRACES_FILE, TEACHER_FILE):
            if (recorded := Workspace(teacher_root).stage_dir(stage) / name).is_file():
                scratch.copies[f"{stage_rel(stage)}/{name}"] = recorded
        if not Path(str(teacher.path)).is_absolute():
            scratch.links[str(teacher.path)] = teacher_root / str(teacher.path)
    dumped = params.model_dump(mode="json")
    scratch.texts[PARAMS] = yaml.safe_dump(dumped, sort_keys=False)
    return scratch, params


def _link_base_model(scratch: Scratch, pinned: PinnedSource, folder: Path) -> None:
    """Link the base model's files into the scratch Hub cache and write its pin beside them.

    Raises:
        ArtifactError: The pin names a file outside its snapshot (a stranger's record).
    """
    assert pinned.commit is not None, "only Hub pins are linked"
    cache = Workspace(Path())
    snapshot = cache.hub_snapshot("model", pinned.repo, pinned.commit).as_posix()
    for f in pinned.files:
        if (why := unsafe_path_reason(f.path)) is not None:
            raise ArtifactError(f"the base model's record names {f.path!a}, which {why}.")
        if (folder / f.path).is_file():  # a missing one: the replay fetches it from the Hub
            scratch.links[f"{snapshot}/{f.path}"] = folder / f.path
    pin = cache.hub_pin("model", pinned.repo, pinned.commit).as_posix()
    scratch.texts[pin] = dump_json(pinned.model_dump(mode="json"))


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


_ERROR_LINE = re.compile(r"^(?:[\w.]+(?:Error|Exception)|error): .+$")
"""The line that says what went wrong, in a worker's traceback (``ArtifactError: ...``)."""
_RANK = re.compile(r"^\[(?:rank|default)\d+\]:\s?")


def failure_line(log_text: str) -> str:
    """The last exception line of a torchrun log (not the whole traceback), or its last line."""
    lines = [_RANK.sub("", line).strip() for line in log_text.splitlines() if line.strip()]
    found = [line for line in lines if _ERROR_LINE.match(line)]
    # torchrun's own ChildFailedError summary comes last; the worker's own error is more useful
    useful = [line for line in found if "ChildFailedError" not in line]
    line = (useful or found or lines or ["no output"])[-1]
    return line[:500]


@dataclass(frozen=True)
class Replayed:
    """What a replay ran: rank 0's report and the replaying host's fingerprint."""

    report: TrainReport
    fingerprint: dict[str, str]


def replay_fingerprint(params: PipelineParams, *, world_size: int) -> dict[str, str]:
    """The fingerprint of this (replaying) process, as the trainer records it."""
    compute = params.compute
    return fingerprint(world_size=world_size, nnodes=compute.nnodes, mode=compute.determinism)


def run_replay(
    root: Path, stage: StageName, params: PipelineParams, *, stop_at_step: int, world_size: int
) -> Replayed:
    """Resume ``stage`` in the scratch workspace ``root`` and run it to ``stop_at_step``.

    One process under ``compute.deterministic`` true or false runs here; a ``portable`` one
    (whose kernel pins must precede torch) and more than one run `main` under ``python`` or
    ``python -m torch.distributed.run --standalone`` (argv from `openrelease.train.launch`, the
    environment from its `launch_env`) with ``root/params.yaml`` (which must equal ``params``),
    on this machine.

    Raises:
        ReplayError: The replay process failed (the message ends with its log).
    """
    if world_size == 1 and params.compute.determinism != "portable":
        report = run_stage(stage, params, project_dir=root, stop_at_step=stop_at_step, record=False)
        return Replayed(report, replay_fingerprint(params, world_size=1))
    report_path, log_path = root / "replay-report.json", root / "replay.log"
    local = ComputeParams(launcher="torchrun", nproc_per_node=world_size)
    if world_size == 1:
        local = ComputeParams(launcher="python")
    entry = worker_entry(stage, root, stop_at_step=stop_at_step, report=report_path)
    cmd = launcher_argv(local, entry, resolve=True)
    path = [str(_package_root()), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**launch_env(params.compute), "PYTHONPATH": os.pathsep.join(path)}
    with log_path.open("wb") as log:
        proc = subprocess.run(cmd, cwd=root, env=env, stdout=log, stderr=log, check=False)
    found = root / FINGERPRINT_FILE
    if proc.returncode != 0 or not report_path.is_file() or not found.is_file():
        log_text = log_path.read_text(encoding="utf-8", errors="replace")
        raise ReplayError(
            f"the {world_size}-process replay of {stage} failed (exit {proc.returncode}): "
            f"{failure_line(log_text)}; re-run with OPENRELEASE_DEBUG=1 for the workers' log."
            + (f"\n{log_text[-3000:]}" if os.environ.get("OPENRELEASE_DEBUG") else "")
        )
    host: dict[str, str] = read_json(found)
    return Replayed(read_model(report_path, TrainReport), host)


FINGERPRINT_FILE = "replay-fingerprint.json"
"""Where rank 0 of a replay worker writes its fingerprint, beside its report."""


# --------------------------------------------------------------------------- worker entry
# The second way into this module, for `run_replay` only: on every rank of a multi-process replay,
#   python -m openrelease.reproduce.replay STAGE ROOT STOP_AT_STEP REPORT_JSON
# runs `openrelease train STAGE` in the scratch workspace ROOT without recording (no MLflow, no
# record.json) and stops after STOP_AT_STEP; rank 0 writes its `TrainReport` to REPORT_JSON.

WORKER = "openrelease.reproduce.replay"
"""The module torchrun starts on every rank of a multi-process replay."""


def worker_entry(stage: StageName, root: Path, *, stop_at_step: int, report: Path) -> list[str]:
    """``-m openrelease.reproduce.replay STAGE ROOT STOP_AT_STEP REPORT_JSON``, for `main`."""
    return ["-m", WORKER, stage, str(root), str(stop_at_step), str(report)]


def main(argv: list[str]) -> None:
    """The replay worker on one rank; ``argv`` as `worker_entry` builds it (see above)."""
    parser = argparse.ArgumentParser(prog=f"python -m {WORKER}", description=main.__doc__)
    parser.add_argument("stage", help="a training stage of the workspace params `stages`")
    parser.add_argument("root", type=Path, help="the scratch workspace (holds params.yaml)")
    parser.add_argument("stop_at_step", type=int)
    parser.add_argument("report", type=Path, help="where rank 0 writes its TrainReport (JSON)")
    args = parser.parse_args(argv)
    stage: StageName = args.stage
    root: Path = args.root
    params = load_params(Workspace(root).params)
    report = run_stage(
        stage, params, project_dir=root, stop_at_step=args.stop_at_step, record=False
    )
    if report.rank == 0:
        host = replay_fingerprint(params, world_size=report.world_size)
        write_text_atomic(root / FINGERPRINT_FILE, dump_json(host))
        write_json(args.report, report)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
