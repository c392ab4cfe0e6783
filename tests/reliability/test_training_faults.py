"""Training faults: SIGKILL anywhere resumes to the same bytes; SIGTERM saves; a full disk is clear.

Each kill is a real SIGKILL of a ``python -m openrelease train <stage>`` process (launcher
python, one rank). A ``sitecustomize.py`` written to a temporary folder on PYTHONPATH parks that
process at one exact point (inside a step's update, mid-write of a release checkpoint or of a
training state, between two sampled tokens of a GRPO rollout, ...) and writes a marker file;
the test then kills it by PID. The points are drawn from a seeded RNG (`kill_plan`), so a
failure names a point that reproduces. The reference bytes come from one uninterrupted run of
all five stages; every killed stage, resumed by a second CLI run, must end with the same
checkpoint digests.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from cli_checks import assert_clean_error, invoke
from torchrun_jobs import kill_tree

from openrelease.digest import sha256_file, sha256_tree
from openrelease.layout import CHECKPOINT_META, STATE_FILE, TMP_PREFIX, WEIGHTS, Workspace
from openrelease.manifest import CheckpointMeta, StageRecord, read_json, read_model
from openrelease.params import StageName, load_params
from openrelease.train import checkpoint as ckpt
from openrelease.train import rl, run_stage

pytestmark = pytest.mark.reliability  # tests/reliability/conftest.py adds it too
logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
STAGES: tuple[StageName, ...] = ("pretrain", "sft", "dpo", "distill", "grpo")
SEED = 20261126
SLOTS = {"pretrain": 3, "sft": 2, "dpo": 2, "distill": 2, "grpo": 3}
"""Kill points per stage (12 in all)."""
NUM_STEPS = {"pretrain": 8, "sft": 4, "dpo": 4, "distill": 4, "grpo": 4}
CHECKPOINT_EVERY = {"pretrain": 4, "sft": 2, "dpo": 2, "distill": 2, "grpo": 2}
STATE_EVERY = {"pretrain": 2, "sft": 1, "dpo": 1, "distill": 1, "grpo": 1}
MAX_NEW_TOKENS = 8
WAIT_S = 240.0

PHASES = {
    "update": "after forward/backward of the step, before the optimizer applies it",
    "logged": "after the step's metrics line, before its checkpoint or state",
    "release-write": "mid release-checkpoint write: weights in .tmp-step-N, no meta.json",
    "before-state": "release checkpoint published, its training state not yet written",
    "state-write": "mid training-state write: DCP files in .tmp-step-N, no state.json",
    "generate": "inside a GRPO rollout, before sampling token n of max_new_tokens",
}

HOOK = '''\
"""Loaded as sitecustomize by tests/reliability/test_training_faults.py (test-only)."""
import os
import time
from pathlib import Path

from openrelease.train import rl


def variety(text, answer, num_tokens):
    """Rewards distinct characters: random rollouts differ, so GRPO's advantages are non-zero."""
    return len(set(text)) / 10.0


rl.REWARDS["length"] = variety

FAULT = os.environ.get("FAULT_AT")  # "<phase>:<step>:<nth call of the phase in that step>"
if FAULT:
    import torch

    from openrelease.train import checkpoint
    from openrelease.train import loop

    PHASE, STEP, NTH = FAULT.split(":")
    STEP, NTH = int(STEP), int(NTH)
    PARKED = Path(os.environ["FAULT_PARKED"])
    GO_ON = Path(os.environ["FAULT_PARKED"] + ".go-on")
    now = {"step": 0, "calls": {}, "done": False}

    def park():
        now["done"] = True
        PARKED.write_text(FAULT)
        while not GO_ON.exists():  # SIGKILL lands here; after a SIGTERM the test writes GO_ON
            time.sleep(0.01)

    def hook(module, name, phase, *, after=False):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            if phase == "step":
                now["step"], now["calls"] = args[0], {}
            calls = now["calls"][phase] = now["calls"].get(phase, 0) + 1
            hit = (PHASE, now["step"], calls) == (phase, STEP, NTH) and not now["done"]
            if hit and not after:
                park()
            out = real(*args, **kwargs)
            if hit and after:
                park()
            return out

        setattr(module, name, wrapper)

    hook(loop, "lr_at", "step")  # lr_at(step) starts each step (and _build calls lr_at(1))
    hook(torch.nn.utils, "clip_grad_norm_", "update")
    hook(loop, "_log_metrics", "logged", after=True)
    hook(checkpoint, "save_file", "release-write", after=True)
    hook(checkpoint, "save_state", "before-state")
    hook(checkpoint, "dcp_save", "state-write", after=True)
    hook(rl, "_filtered_probs", "generate")
'''


def variety(text: str, answer: str, num_tokens: int) -> float:
    """The reward HOOK plugs into GRPO, for the in-process reference run."""
    return len(set(text)) / 10.0


@dataclass(frozen=True)
class KillPoint:
    stage: StageName
    phase: str
    step: int
    nth: int = 1

    def __str__(self) -> str:
        nth = f" token {self.nth}" if self.phase == "generate" else ""
        return f"{self.stage} step {self.step} {self.phase}{nth}"


def _steps_with(stage: StageName, phase: str) -> list[int]:
    steps = range(1, NUM_STEPS[stage] + 1)
    last = NUM_STEPS[stage]
    if phase == "release-write":
        return [s for s in steps if s % CHECKPOINT_EVERY[stage] == 0 or s == last]
    if phase in ("before-state", "state-write"):
        return [s for s in steps if s % STATE_EVERY[stage] == 0 or s == last]
    return list(steps)


def kill_plan(seed: int = SEED) -> list[KillPoint]:
    """Distinct (stage, phase, step) points, ``SLOTS[stage]`` per stage, drawn from ``seed``.

    GRPO always gets one point inside generation; the other phases are sampled.
    """
    rng = random.Random(seed)
    plan = []
    for stage in STAGES:
        forced = ["generate"] if stage == "grpo" else []
        others = [p for p in PHASES if p != "generate"]
        for phase in forced + rng.sample(others, SLOTS[stage] - len(forced)):
            nth = rng.randint(1, MAX_NEW_TOKENS) if phase == "generate" else 1
            plan.append(KillPoint(stage, phase, rng.choice(_steps_with(stage, phase)), nth))
    return plan


def test_kill_plan_covers_every_stage_and_the_risky_moments() -> None:
    plan = kill_plan()
    assert len(set(plan)) == 12
    assert {p.stage for p in plan} == set(STAGES)
    phases = {p.phase for p in plan}
    assert {"release-write", "state-write", "generate"} <= phases, plan
    assert kill_plan() == plan  # seeded: the same points on every run


# --------------------------------------------------------------------------- projects, runs


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, built_project: Path) -> Path:
    """The data stage's outputs, fault-test params (1 process) and a migrated MLflow store."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("faults")
    base = root / "base"
    shutil.copytree(built_project, base)
    raw = yaml.safe_load((base / "params.yaml").read_text())
    raw["compute"].update(launcher="python", nproc_per_node=1)
    for stage in STAGES:
        raw[stage].update(state_every=STATE_EVERY[stage])
    raw["grpo"]["rewards"] = {"correctness": 1.0, "format": 0.2, "length": 1.0}
    (base / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(base / "params.yaml")
    for stage in STAGES:
        p = params.stage(stage)
        assert (p.num_steps, p.checkpoint_every) == (NUM_STEPS[stage], CHECKPOINT_EVERY[stage])
    assert params.grpo.max_new_tokens == MAX_NEW_TOKENS
    MlflowClient(tracking_uri=f"sqlite:///{base / 'mlflow.db'}").search_experiments()
    return base


@pytest.fixture(scope="module")
def hook_dir(base: Path) -> Path:
    """A folder holding HOOK as sitecustomize.py, for the PYTHONPATH of the CLI runs."""
    folder = base.parent / "hook"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(HOOK)
    return folder


@pytest.fixture(scope="module")
def reference(base: Path) -> Path:
    """All five stages run once, uninterrupted (in this process)."""
    ref = base.parent / "reference"
    shutil.copytree(base, ref)
    params = load_params(ref / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setitem(rl.REWARDS, "length", variety)
        for stage in STAGES:
            assert not run_stage(stage, params, project_dir=ref).interrupted
    rows = (ref / "artifacts/grpo/metrics.jsonl").read_text().splitlines()
    assert all(json.loads(row)["grad_norm"] > 0 for row in rows)  # GRPO really updates
    return ref


def _digests(project: Path, stage: str) -> list[tuple[int, str]]:
    metas = ckpt.list_checkpoints(Workspace(project).stage_dir(stage) / "checkpoints")
    return [(m.step, m.checkpoint_digest) for m in metas]


def _final_digest(project: Path, stage: str) -> str:
    return ckpt.final_checkpoint(project, stage)[1].checkpoint_digest


def _stage_project(base: Path, reference: Path, stage: str, dest: Path) -> Path:
    """A project where every stage before ``stage`` is done (the reference's outputs)."""
    shutil.copytree(base, dest)
    for earlier in STAGES[: STAGES.index(stage)]:
        shutil.copytree(reference / "artifacts" / earlier, dest / "artifacts" / earlier)
    return dest


def _cli(
    project: Path, stage: str, hook_dir: Path, *, name: str, fault: KillPoint | None = None
) -> subprocess.Popen[bytes]:
    """``python -m openrelease train <stage> --json`` in ``project``, output in ``name``.*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FAULT_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(hook_dir), str(REPO_ROOT)])
    if fault is not None:
        env["FAULT_AT"] = f"{fault.phase}:{fault.step}:{fault.nth}"
        env["FAULT_PARKED"] = str(project / "parked")
    with (project / f"{name}.out").open("wb") as out, (project / f"{name}.err").open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "openrelease", "train", stage, "--json"],
            cwd=project,
            env=env,
            stdout=out,
            stderr=err,
        )


def _logs(project: Path) -> str:
    return "\n".join(f"{p.name}:\n{p.read_text()[-2000:]}" for p in sorted(project.glob("*.err")))


def _wait_parked(proc: subprocess.Popen[bytes], project: Path) -> None:
    marker, deadline = project / "parked", time.monotonic() + WAIT_S
    while not marker.exists():
        assert proc.poll() is None, f"exited {proc.returncode} before the point:\n{_logs(project)}"
        assert time.monotonic() < deadline, f"never reached the point:\n{_logs(project)}"
        time.sleep(0.01)


def _finish(project: Path, stage: str, hook_dir: Path) -> dict[str, int]:
    """Run the stage to the end through the CLI (no fault); return its ``--json`` report."""
    proc = _cli(project, stage, hook_dir, name="resume")
    try:
        rc = proc.wait(timeout=WAIT_S)
    finally:
        kill_tree(proc, timeout=30)
    assert rc == 0, _logs(project)
    report: dict[str, int] = json.loads((project / "resume.out").read_text())
    return report


def _partials(project: Path, stage: str) -> list[str]:
    root = Workspace(project).stage_dir(stage)
    return sorted(
        f"{sub}/{p.name}"
        for sub in ("checkpoints", "states")
        if (root / sub).is_dir()
        for p in (root / sub).iterdir()
        if p.name.startswith(TMP_PREFIX)
    )


def _latest_state_step(project: Path, stage: str) -> int:
    state = ckpt.latest_state(Workspace(project).stage_dir(stage) / "states")
    return 0 if state is None else int(read_json(state / STATE_FILE)["step"])


# --------------------------------------------------------------------------- SIGKILL x 12


@dataclass(frozen=True)
class KillResult:
    point: KillPoint
    partials_at_kill: list[str]
    resumed_from: int
    identical: bool
    problems: list[str]


def _kill_and_resume(
    point: KillPoint, base: Path, reference: Path, hook_dir: Path, dest: Path
) -> KillResult:
    project = _stage_project(base, reference, point.stage, dest)
    proc = _cli(project, point.stage, hook_dir, name="killed", fault=point)
    try:
        _wait_parked(proc, project)
        partials = _partials(project, point.stage)
        state_step = _latest_state_step(project, point.stage)
    finally:
        kill_tree(proc, timeout=30)
    problems = [] if proc.returncode == -signal.SIGKILL else [f"exit {proc.returncode}"]
    tmp = f"{TMP_PREFIX}step-{point.step}"
    root = Workspace(project).stage_dir(point.stage)
    if point.phase == "release-write":
        folder = root / "checkpoints" / tmp
        if not (folder / WEIGHTS).is_file() or (folder / CHECKPOINT_META).exists():
            problems.append(f"not killed mid-write of checkpoints/{tmp}: {partials}")
    if point.phase == "state-write" and f"states/{tmp}" not in partials:
        problems.append(f"not killed mid-write of states/{tmp}: {partials}")
    if (root / "manifest.json").exists():
        problems.append("the killed stage wrote its manifest")
    report = _finish(project, point.stage, hook_dir)
    if report["start_step"] != state_step:
        problems.append(f"resumed from step {report['start_step']}, not {state_step}")
    if _partials(project, point.stage):
        problems.append(f"left behind: {_partials(project, point.stage)}")
    got, want = _digests(project, point.stage), _digests(reference, point.stage)
    if got != want:
        problems.append(f"checkpoints {got} != reference {want}")
    identical = _final_digest(project, point.stage) == _final_digest(reference, point.stage)
    return KillResult(point, partials, state_step, identical and not problems, problems)


@pytest.mark.slow
def test_sigkill_at_twelve_points_then_resume_gives_the_reference_bytes(
    base: Path, reference: Path, hook_dir: Path, tmp_path: Path
) -> None:
    plan = kill_plan()
    with ThreadPoolExecutor(max_workers=2) as pool:  # two processes at a time (2 cores)
        jobs = [
            pool.submit(_kill_and_resume, point, base, reference, hook_dir, tmp_path / f"kill-{i}")
            for i, point in enumerate(plan)
        ]
        results = [job.result() for job in jobs]
    lines = [
        f"{'same' if r.identical else 'DIFF'}  {r.point}  (partials {r.partials_at_kill}, "
        f"resumed from step {r.resumed_from}) {'; '.join(r.problems)}"
        for r in results
    ]
    summary = f"{sum(r.identical for r in results)}/{len(results)} identical\n" + "\n".join(lines)
    logger.info("%s", summary)
    assert all(r.identical for r in results), summary


# --------------------------------------------------------------------------- SIGTERM


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_143(
    base: Path, reference: Path, hook_dir: Path, tmp_path: Path
) -> None:
    """SIGTERM during step 3 (no state due until step 4): step 3 ends, its state is saved."""
    project = _stage_project(base, reference, "pretrain", tmp_path / "proj")
    fault = KillPoint("pretrain", "update", 3)
    proc = _cli(project, "pretrain", hook_dir, name="terminated", fault=fault)
    try:
        _wait_parked(proc, project)
        proc.send_signal(signal.SIGTERM)
        (project / "parked.go-on").touch()
        rc = proc.wait(timeout=WAIT_S)
    finally:
        kill_tree(proc, timeout=30)
    assert rc == 143, _logs(project)
    root = Workspace(project).stage_dir("pretrain")
    assert read_json(root / "states/step-3" / STATE_FILE)["step"] == 3
    assert read_model(root / "record.json", StageRecord).status == "KILLED"
    assert not (root / "manifest.json").exists()
    assert len((root / "metrics.jsonl").read_text().splitlines()) == 3
    assert _partials(project, "pretrain") == []
    report = _finish(project, "pretrain", hook_dir)
    assert (report["start_step"], report["final_step"]) == (3, 8)
    assert _digests(project, "pretrain") == _digests(reference, "pretrain")
    assert read_model(root / "record.json", StageRecord).status == "FINISHED"


# --------------------------------------------------------------------------- full disk


def _assert_valid_checkpoint(folder: Path) -> None:
    """Every file meta.json lists is there with its sha256; the digest covers exactly them."""
    meta = read_model(folder / CHECKPOINT_META, CheckpointMeta)
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert on_disk == {f.path for f in meta.files} | {CHECKPOINT_META}
    for entry in meta.files:
        assert sha256_file(folder / entry.path) == entry.sha256, entry.path
    assert sha256_tree({f.path: f.sha256 for f in meta.files}) == meta.checkpoint_digest


@contextlib.contextmanager
def _tmpfs(folder: Path) -> Iterator[Path]:
    """Mount an 8 MiB tmpfs on ``folder`` (skip unless this runs as root and may mount)."""
    folder.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)]
    done = subprocess.run(mount, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(disk: Path, *, leave: int) -> None:
    """Write a ballast file so that only about ``leave`` bytes stay free on ``disk``."""
    size = shutil.disk_usage(disk).free - leave
    (disk / "ballast").write_bytes(b"\0" * max(0, size - size % 4096))


@contextlib.contextmanager
def _full_disk(where: str, fail_at: int, *, real_disk: Path | None) -> Iterator[None]:
    """Make the ``fail_at``-th release checkpoint (or training state) write hit a full disk.

    With ``real_disk`` (a small tmpfs) the disk is really filled up, leaving 64 KiB, just before
    that write: the real writers fail as they do in the field (safetensors with its own error,
    DCP with a CheckpointException around torch's "unexpected pos"). Without it the writer is
    patched: the release one leaves a partial file and raises OSError(ENOSPC); the state one
    raises what DCP raises, on a disk that reports no free bytes.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    calls = []
    name = "save_file" if where == "release" else "dcp_save"
    real_write = getattr(ckpt, name)

    def write(*args: object, **kwargs: object) -> object:
        calls.append(args)
        if len(calls) != fail_at:
            return real_write(*args, **kwargs)
        if real_disk is not None:
            _fill(real_disk, leave=64 << 10)
            return real_write(*args, **kwargs)
        if where == "release":
            filename = str(args[1])
            Path(filename).write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        mp.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
        error = RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 704 vs 598")
        raise CheckpointException("write", {0: (error, traceback.StackSummary())})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckpt, name, write)
        yield
    assert len(calls) >= fail_at, "the full disk was never hit"


@pytest.mark.slow
@pytest.mark.parametrize("real", [False, True], ids=["patched-writer", "real-tmpfs"])
@pytest.mark.parametrize(
    ("where", "fail_at", "failed_path", "resume_step"),
    [
        ("release", 2, "checkpoints/step-8", 6),  # release writes: steps 4, 8
        ("state", 3, "states/step-6", 4),  # state writes: steps 2, 4, 6
    ],
)
def test_full_disk_fails_clearly_and_keeps_the_last_checkpoint(
    where: str,
    fail_at: int,
    failed_path: str,
    resume_step: int,
    real: bool,
    base: Path,
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = _stage_project(base, reference, "pretrain", tmp_path / "proj")
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = Path.cwd() / "artifacts" / "pretrain"
    with contextlib.ExitStack() as stack:
        disk = stack.enter_context(_tmpfs(root)) if real else None
        with _full_disk(where, fail_at, real_disk=disk):
            result = invoke("train", "pretrain")
        line = assert_clean_error(result, match=r"disk full")
        assert f"{root / failed_path}:" in line, line
        assert "MiB free" in line, line
        assert _partials(project, "pretrain") == []
        assert [m.step for m in ckpt.list_checkpoints(root / "checkpoints")] == [4]
        _assert_valid_checkpoint(root / "checkpoints/step-4")
        assert _digests(project, "pretrain")[0] == _digests(reference, "pretrain")[0]
        assert _latest_state_step(project, "pretrain") == resume_step
        assert not (root / "manifest.json").exists()
        assert read_model(root / "record.json", StageRecord).status == "FAILED"

        (root / "ballast").unlink(missing_ok=True)  # the user frees some space
        result = invoke("train", "pretrain", "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert (report["start_step"], report["final_step"]) == (resume_step, 8)
        assert _partials(project, "pretrain") == []
        assert _digests(project, "pretrain") == _digests(reference, "pretrain")
