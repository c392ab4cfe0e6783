"""Replay a recorded stretch of training from a workspace or a bundle (read-only) and compare.

Picks the state and checkpoint, checks they belong to one run, runs `openrelease.reproduce.replay`;
`certify` replays the last stretch of every stage for ``bundle --certify``.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError

import openrelease
from openrelease.data import hub
from openrelease.errors import ArtifactError, ParamsError
from openrelease.layout import DATA_POINTERS, STAGE_MANIFEST, STATE_FILE, Bundle, Workspace
from openrelease.manifest import (
    CheckpointMeta,
    DataManifest,
    PinnedSource,
    ReproCertificate,
    StageRecord,
    StageReplay,
    read_json,
    read_model,
    write_json,
)
from openrelease.params import PipelineParams, StageName, load_params
from openrelease.record.fingerprint import Difference, compare, explain
from openrelease.reproduce.diff import CheckpointDiff, diff_checkpoints
from openrelease.reproduce.replay import (
    Replayed,
    ReplayError,
    build_scratch,
    device_name,
    local_env,
    run_replay,
    scratch_for,
)
from openrelease.safeio import loads_json, read_regular
from openrelease.train import checkpoint as ckpt
from openrelease.train import stage_params_digest
from openrelease.train.portable import pickle_free_problem
from openrelease.verify.tokenizer_probe import has_own_regex

GUARANTEE = (
    "bitwise identical sha256 when replayed with the recorded world size and thread count: "
    "on any x86-64 CPU with AVX2 under compute.deterministic: portable, on the same hardware "
    "class under true; elsewhere the drift is measured and the fingerprint names its causes"
)
_VERSIONED = ("torch", "transformers", "openrelease")
"""Packages whose recorded version (record.json) a replay compares with its own."""
ProgressFn = Callable[[str], None]
"""Called with a short line as each phase starts (prepare, replay, compare)."""


class ReproduceReport(CheckpointDiff):
    """What `reproduce` replayed, where, and how its checkpoint compares with the record."""

    target: str
    layout: Literal["workspace", "bundle"]
    stage: str
    from_step: int
    """0: the stage's initial weights (no training state needed)."""
    to_step: int
    world_size: int
    """Processes of the recorded run (the replay uses as many)."""
    device: str
    """``cpu (<machine>)``, ``cuda (<gpu>)``, or ``unknown`` without a record.json."""
    num_threads: int
    replay_world_size: int
    replay_device: str
    replay_num_threads: int
    seconds: float
    """Wall time of the replay: scratch workspace, training (process start included), diff."""
    deterministic: str
    """The recorded run's ``compute.deterministic``: portable, true or false."""
    fingerprint_differences: tuple[Difference, ...] = ()
    """Where the replaying host's fingerprint differs from record.json's (none: no record)."""
    explanation: str | None = None
    """On drift: the differences that can explain it, or that none can (nondeterminism)."""

    def to_replay(self) -> StageReplay:
        """This report as a certificate entry."""
        weights = self.weights()
        return StageReplay(
            **self.model_dump(include=set(StageReplay.model_fields)),
            weights_sha256=weights.recorded or "",
            replayed_weights_sha256=weights.replayed or "",
        )


# --------------------------------------------------------------------------- where things are


Target = Workspace | Bundle
"""What a replay reads: a workspace or a release bundle."""


def _target(path: Path) -> Target:
    bundle = Bundle(path)
    if bundle.is_bundle():
        return bundle
    workspace = Workspace(path)
    if workspace.artifacts.is_dir():
        return workspace
    raise ParamsError(
        f"{path} is neither a workspace (holds artifacts/) nor a release bundle "
        "(holds MANIFEST.json and configs/params.yaml)."
    )


def _kind(target: Target) -> Literal["workspace", "bundle"]:
    return "bundle" if isinstance(target, Bundle) else "workspace"


def _data_dir(target: Target, params: PipelineParams) -> Path:
    """The data stage's folder: ``data/`` in a bundle, ``data.out_dir`` in a workspace."""
    return target.data_dir if isinstance(target, Bundle) else target.data(params.data.out_dir)


def _more_states_hint(target: Target, stage: str) -> str:
    if isinstance(target, Bundle):
        return "release.retention.state_every_k keeps more in a bundle"
    return f"{stage}.state_every and {stage}.keep_last_states keep more"


def _choose_steps(
    stage: str,
    steps: list[int],
    states: Mapping[int, Path],
    span: tuple[int | None, int | None],
    hint: str,
) -> tuple[int, int]:
    """Resolve the (from, to) defaults against the recorded checkpoint and state steps."""
    from_step, to_step = span
    final = steps[-1]
    startable = [0, *(s for s in states if s < final)]
    if from_step is None:
        limit = final if to_step is None else to_step
        from_step = max(s for s in startable if s < limit)
    elif from_step >= final:
        raise ArtifactError(f"{stage} has no release checkpoint after step {from_step}.")
    elif from_step not in startable:
        listed = ", ".join(map(str, startable))
        raise ArtifactError(
            f"no {stage} training state at step {from_step}: replay can start from steps "
            f"{listed}; {hint}."
        )
    if to_step is None:
        to_step = next(s for s in steps if s > from_step)
    elif to_step not in steps or to_step <= from_step:
        raise ArtifactError(
            f"{stage} has release checkpoints at steps {', '.join(map(str, steps))}; "
            f"--to-step must be one of them after step {from_step}."
        )
    return from_step, to_step


# --------------------------------------------------------------------------- the recorded run


def _stage_params(
    target: Target, stage: StageName, given: PipelineParams | None, digest: str
) -> PipelineParams:
    """The params the recorded run used: the record's stage sections over the params file."""
    base = given if given is not None else load_params(target.params)
    candidates = [base]
    record_path = target.record(stage)
    if record_path.is_file():
        recorded = read_model(record_path, StageRecord).params
        try:
            merged = {**base.model_dump(mode="json"), **recorded}
            candidates.insert(0, PipelineParams.model_validate(merged))
        except ValidationError:
            pass  # a record of an older params schema: only the params file can match
    for params in candidates:
        if stage_params_digest(params, stage) == digest:
            return params
    raise ParamsError(
        f"the recorded {stage} run used params with digest {digest[:19]}..., but "
        f"{target.params} (and {record_path.name}, if any) give "
        f"{stage_params_digest(base, stage)[:19]}...; restore the params the run used."
    )


def _find_init(
    target: Target, stage: StageName, digest: str | None, params: PipelineParams
) -> tuple[StageName, Path, CheckpointMeta] | None:
    """The checkpoint of the earlier stage the recorded run started from (None: no stage)."""
    prev = params.parent_stage(stage)
    if prev is None:
        return None
    for meta in ckpt.list_checkpoints(target.checkpoints(prev)):
        if meta.checkpoint_digest == digest:
            return prev, target.checkpoint(prev, meta.step), meta
    raise ArtifactError(
        f"the recorded {stage} run started from checkpoint {str(digest)[:19]}..., which no "
        f"{prev} checkpoint under {target.checkpoints(prev)} has; replay needs it."
    )


def _base_files(target: Target, first: CheckpointMeta) -> tuple[PinnedSource, Path] | None:
    """The Hub base model the stage started from, and where its files are here.

    A bundle's base_model/ (``release.include_base_model``) or the workspace's Hub cache; None
    when the stage did not start from a Hub base model or its files are not here (the replay
    then fetches them from the Hub by the recorded pin).
    """
    base = first.base_model
    if base is None or base.kind != "hf" or first.parent_digest != base.digest:
        return None
    if base.commit is None or not (hub.is_repo_id(base.repo) and hub.is_commit(base.commit)):
        return None  # a malformed record: never a path; the replay resolves it (and refuses)
    if isinstance(target, Bundle):
        folder = target.base_model
    else:
        folder = target.hub_snapshot("model", base.repo, base.commit)
    return (base, folder) if folder.is_dir() else None


def _check_regular_files(bundle_dir: Path) -> None:
    """A bundle holds regular files only: a symlink, FIFO or device in it is refused up front."""
    for dirpath, dirnames, filenames in os.walk(bundle_dir):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
                shown = ascii(path.relative_to(bundle_dir).as_posix())
                raise ArtifactError(
                    f"{shown} in {bundle_dir} is {kind}; a bundle holds regular files only, so "
                    "nothing ran (run `openrelease verify` on it).",
                    path=str(path),
                )


MAX_TOKENIZER_BYTES = 512 << 20


def _check_tokenizer_regexes(tokenizer_dir: Path) -> None:
    """A bundle's tokenizer must not bring regular expressions of its own.

    `tokenizers` runs them with no time limit over every training text, so a crafted pattern
    would hang the replay; openrelease's own tokenizers (byte-level BPE) never have one.
    """
    for path in sorted(tokenizer_dir.glob("*.json")):
        doc = loads_json(read_regular(path, max_bytes=MAX_TOKENIZER_BYTES), where=str(path))
        if has_own_regex(doc):
            raise ArtifactError(
                f"{path} holds regular expressions of its own, which a replay would run with no "
                "time limit over every training text; openrelease's tokenizers have none, so "
                "nothing ran (run `openrelease verify` on the bundle).",
                path=str(path),
            )


def _check_pickle_free(target: Bundle, stage: str, state_dir: Path) -> None:
    """A bundle's training state must be safetensors + JSON: a pickle in it is never loaded."""
    if problem := pickle_free_problem(state_dir):
        rel = state_dir.relative_to(target.root).as_posix()
        raise ArtifactError(
            f"{rel} {problem}: a bundle's training states must be pickle-free (safetensors + "
            f"JSON), so it is not loaded and nothing ran; replay {stage} from step 0 "
            "(--from-step 0) or ask the publisher for a bundle built by this openrelease.",
            path=str(state_dir),
        )


def _check_state(state_dir: Path, identity: dict[str, str | None]) -> dict[str, Any]:
    info: dict[str, Any] = read_json(state_dir / STATE_FILE)
    wrong = [k for k, v in identity.items() if info.get(k) != v]
    if wrong:
        raise ArtifactError(
            f"{state_dir} was written by another run than the recorded checkpoints "
            f"({', '.join(wrong)} differ); it cannot start a replay of them."
        )
    return info


def _check_data(target: Target, data_dir: Path, record: StageRecord | None) -> DataManifest:
    """The data manifest, once the data is known to be the recorded run's and to be here."""
    manifest = read_model(data_dir / STAGE_MANIFEST, DataManifest)
    recorded = {i.name: i.digest for i in record.inputs} if record is not None else {}
    if recorded.get("data-manifest", manifest.data_digest) != manifest.data_digest:
        raise ArtifactError(
            f"the recorded run read data {recorded['data-manifest'][:19]}..., but {data_dir} "
            f"holds {manifest.data_digest[:19]}...; replay needs the recorded data."
        )
    if isinstance(target, Bundle):
        _check_tokenizer_regexes(data_dir / manifest.tokenizer_dir)
    pointers = data_dir / DATA_POINTERS
    if isinstance(target, Bundle) and pointers.is_file():
        for entry in read_json(pointers)["files"]:
            if not (data_dir / entry["path"]).is_file():
                raise ArtifactError(
                    f"data/{entry['path']} is only a pointer in this bundle; download "
                    f"{entry['url']} (sha256 {entry['sha256'][:16]}...) into data/ to replay."
                )
    return manifest


def _version(dist: str) -> str:
    """Installed version of ``dist``, or ``absent`` (as record.json writes it)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


# --------------------------------------------------------------------------- the replay


@dataclass(frozen=True)
class _Replay:
    """A checked plan: what to replay, from which inputs, on how many processes."""

    target: Target
    stage: StageName
    steps: tuple[int, int]
    params: PipelineParams
    init: tuple[StageName, Path, CheckpointMeta] | None
    state: tuple[int, Path] | None
    base: tuple[PinnedSource, Path] | None
    """The Hub base model the stage starts from and its files here (see `_base_files`)."""
    world_size: int
    num_threads: int
    env: dict[str, str]
    """The recorded run's environment (record.json); empty without one."""
    fingerprint: dict[str, str]
    """The recorded run's hardware and kernel fingerprint (record.json); empty without one."""


def _plan(
    target: Target,
    stage: StageName,
    span: tuple[int | None, int | None],
    given: PipelineParams | None,
) -> _Replay:
    """Choose the steps and check that the state, data and params belong to the recorded run."""
    metas = ckpt.list_checkpoints(target.checkpoints(stage))
    if not metas:
        raise ArtifactError(
            f"{target.checkpoints(stage)} holds no {stage} release checkpoint; nothing to replay."
        )
    states = ckpt.list_states(target.states(stage))
    hint = _more_states_hint(target, stage)
    first, last = _choose_steps(stage, [m.step for m in metas], states, span, hint)
    if first and isinstance(target, Bundle):
        _check_pickle_free(target, stage, states[first])
    meta = next(m for m in metas if m.step == last)
    params = _stage_params(target, stage, given, meta.params_digest)
    record_path = target.record(stage)
    record = read_model(record_path, StageRecord) if record_path.is_file() else None
    data = _check_data(target, _data_dir(target, params), record)
    identity = {
        "params_digest": meta.params_digest,
        "data_digest": data.data_digest,
        "init_digest": metas[0].parent_digest,
    }
    info = _check_state(states[first], identity) if first else {}
    env = record.environment if record is not None else {}
    compute = params.compute
    launched = compute.nproc_per_node * compute.nnodes
    world_size = int(info.get("world_size") or env.get("world_size") or launched)
    if (
        device_name(local_env(), compute).startswith("cuda")
        and world_size > torch.cuda.device_count()
    ):
        raise ArtifactError(
            f"the recorded {stage} run had {world_size} processes; this machine has "
            f"{torch.cuda.device_count()} GPUs."
        )
    return _Replay(
        target=target,
        stage=stage,
        steps=(first, last),
        params=params,
        init=_find_init(target, stage, metas[0].parent_digest, params),
        base=_base_files(target, metas[0]),
        state=(first, states[first]) if first else None,
        world_size=world_size,
        num_threads=int(info.get("num_threads") or env.get("num_threads") or compute.num_threads),
        env=env,
        fingerprint=record.fingerprint if record is not None else {},
    )


def _run(plan: _Replay, root: Path, say: ProgressFn) -> tuple[Replayed, CheckpointDiff]:
    """Build the scratch workspace in ``root``, replay, and diff against the recorded checkpoint."""
    (first, last), stage = plan.steps, plan.stage
    target = plan.target
    scratch, params = scratch_for(
        stage,
        plan.params,
        data_dir=_data_dir(target, plan.params),
        init=plan.init,
        state=plan.state,
        teacher_root=target.root if isinstance(target, Workspace) else None,
        base=plan.base,
    )
    say(f"preparing a scratch workspace in {root}")
    build_scratch(root, scratch)
    say(f"replaying {stage} steps {first + 1}..{last} on {plan.world_size} process(es)")
    replayed = run_replay(root, stage, params, stop_at_step=last, world_size=plan.world_size)
    report = replayed.report
    if (report.start_step, report.final_step) != (first, last):
        raise ReplayError(
            f"the replay ran steps {report.start_step + 1}..{report.final_step}, "
            f"not {first + 1}..{last}; see the warnings above."
        )
    recorded_dir = target.checkpoint(stage, last)
    say(f"comparing with {recorded_dir}")
    metrics = target.metrics(stage)
    diff = diff_checkpoints(recorded_dir, metrics, root=root, stage=stage, steps=(first + 1, last))
    return replayed, diff


# --------------------------------------------------------------------------- entry points


def reproduce(
    target: Path,
    *,
    stage: StageName,
    from_step: int | None = None,
    to_step: int | None = None,
    params: PipelineParams | None = None,
    work_dir: Path | None = None,
    progress: ProgressFn | None = None,
) -> ReproduceReport:
    """Replay ``stage`` from its training state at ``from_step`` to checkpoint ``to_step``.

    Runs in this process when the recorded run had one process, else under torchrun with the
    recorded number of processes. ``target`` is only read.

    Args:
        target: A workspace (holds artifacts/) or a release bundle (holds MANIFEST.json).
        stage: The training stage.
        from_step: A step with a training state, or 0 (the stage's initial weights). Default:
            the last state before the final checkpoint (before ``to_step`` if given), else 0.
        to_step: A release checkpoint after ``from_step``. Default: the next one.
        params: The pipeline params (default: the target's params file); the stage sections
            recorded in record.json win when they match the checkpoint's params digest.
        work_dir: Where the scratch workspace goes (default: the system's temp folder).
        progress: Called with a line as each phase starts.

    Returns:
        Identical or not, with the drift per tensor and the loss of every replayed step.

    Raises:
        ArtifactError: A checkpoint, state, data file or the initial checkpoint is missing;
            for a missing state the message lists the steps a replay can start from.
        ParamsError: ``target`` is no workspace or bundle, or its params are not the recorded.
        ReplayError: The replay process failed.
    """
    resolved = _target(target)
    if isinstance(resolved, Bundle):
        _check_regular_files(resolved.root)
    plan = _plan(resolved, stage, (from_step, to_step), params)
    root = Path(tempfile.mkdtemp(prefix=f"openrelease-replay-{stage}-", dir=work_dir))
    started = time.monotonic()
    try:
        replayed, diff = _run(plan, root, progress or (lambda _line: None))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    notes = list(diff.notes)
    for dist in _VERSIONED:
        here = _version(dist)
        if plan.env.get(dist, here) != here:
            notes.append(f"recorded with {dist} {plan.env[dist]}, replayed with {here}")
    compute = plan.params.compute
    differences = compare(plan.fingerprint, replayed.fingerprint)
    if not plan.fingerprint:
        notes.append(
            "the record has no hardware fingerprint (an older openrelease wrote it); "
            "what differs between the machines cannot be named"
        )
    return ReproduceReport(
        **{**dict(diff), "notes": tuple(notes)},
        target=str(target),
        layout=_kind(plan.target),
        stage=stage,
        from_step=plan.steps[0],
        to_step=plan.steps[1],
        world_size=plan.world_size,
        device=device_name(plan.env, compute),
        num_threads=plan.num_threads,
        replay_world_size=replayed.report.world_size,
        replay_device=device_name(local_env(), compute),
        replay_num_threads=compute.num_threads,
        seconds=round(time.monotonic() - started, 3),
        deterministic=compute.determinism,
        fingerprint_differences=tuple(differences),
        explanation=None if diff.identical or not plan.fingerprint else explain(differences),
    )


def certify(
    project_dir: Path,
    params: PipelineParams,
    *,
    work_dir: Path | None = None,
    progress: ProgressFn | None = None,
) -> ReproCertificate:
    """Replay the last stretch of every stage that ran; write ``artifacts/certificate.json``.

    Each replay starts from the stage's last training state before its final checkpoint (or
    from its initial weights when it kept none) and runs to the next checkpoint.

    Returns:
        The certificate (identical or drift figures per stage), also written to disk.

    Raises:
        ArtifactError: No stage has run, or a replay lacks an input (see `reproduce`).
    """
    workspace = Workspace(project_dir)
    replays = []
    for stage in params.train_stages:
        if workspace.stage_manifest(stage).is_file():
            report = reproduce(
                project_dir, stage=stage, params=params, work_dir=work_dir, progress=progress
            )
            replays.append(report.to_replay())
    if not replays:
        raise ArtifactError(
            f"no training stage has run in {project_dir}; run `dvc repro pretrain` first."
        )
    certificate = ReproCertificate(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        openrelease_version=openrelease.__version__,
        guarantee=GUARANTEE,
        replays=tuple(replays),
    )
    write_json(workspace.certificate, certificate)
    return certificate
