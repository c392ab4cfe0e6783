"""What a run's record says about where it came from, and the names MLflow shows for it.

Git commit and diff, environment and pip freeze, MLflow's source tags, the DVC experiment and its
param overrides, dataset sources, LoggedModel keys, the pipeline step axis, registry names.
"""

from __future__ import annotations

import getpass
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from openrelease.digest import sha256_bytes
from openrelease.layout import CHECKPOINT_META, PARAMS, Workspace
from openrelease.manifest import CheckpointMeta, GitInfo, StageRecord, read_model, write_text_atomic
from openrelease.params import RESERVED_NAMES, PipelineParams
from openrelease.secrets import redact

_ENV_KEPT = (
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NCCL_ALGO",
    "NCCL_PROTO",
    "CUBLAS_WORKSPACE_CONFIG",
    "PYTHONHASHSEED",
)


def git_output(project_dir: Path, *args: str) -> str | None:
    """The stdout of ``git args`` in the project, or None when git fails or is missing."""
    try:
        proc = subprocess.run(
            ["git", *args], cwd=project_dir, capture_output=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.decode("utf-8", "replace") if proc.returncode == 0 else None


_DVC_BOOKKEEPING = "dvc.lock"
"""DVC rewrites it as stages finish: a change to it alone does not make the code dirty."""


def git_info(project_dir: Path, journal_dir: Path) -> GitInfo:
    """Commit and dirtiness; a dirty tree's diff is saved beside the journal (redacted).

    In a `dvc exp run` (``DVC_EXP_NAME`` / ``DVC_EXP_BASELINE_REV`` set), the params DVC applied
    are the experiment's overrides, recorded as such, not as a dirty tree.
    """
    commit = git_output(project_dir, "rev-parse", "HEAD")
    status = git_output(project_dir, "status", "--porcelain", "--untracked-files=no", "--", ".")
    prefix = (git_output(project_dir, "rev-parse", "--show-prefix") or "").strip()
    experiment = os.environ.get("DVC_EXP_NAME") or (
        "workspace" if os.environ.get("DVC_EXP_BASELINE_REV") else None
    )
    expected = {prefix + _DVC_BOOKKEEPING} | ({prefix + PARAMS} if experiment else set())
    changed = [line[3:].strip() for line in (status or "").splitlines() if line.strip()]
    dirty = any(path not in expected for path in changed)
    overrides = dvc_experiment(project_dir)[1] if experiment else {}
    diff_sha = None
    if dirty:
        diff = redact(git_output(project_dir, "diff", "HEAD") or "")
        write_text_atomic(journal_dir / "git.diff", diff)
        diff_sha = sha256_bytes(diff.encode("utf-8"))
    return GitInfo(
        commit=commit.strip() if commit else None,
        dirty=dirty,
        diff_sha256=diff_sha,
        experiment=experiment,
        overrides=overrides,
    )


def environment_info(*, world_size: int, num_threads: int) -> dict[str, str]:
    """Versions, hardware and the numerics-relevant environment (never secrets)."""
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "world_size": str(world_size),
        "num_threads": str(num_threads),
    }
    for dist in ("torch", "transformers", "tokenizers", "numpy", "mlflow", "dvc", "openrelease"):
        try:
            env[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[dist] = "absent"
    if "torch" in sys.modules:
        import torch

        env["cuda"] = str(torch.version.cuda)
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_count"] = str(torch.cuda.device_count())
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))  # type: ignore[no-untyped-call]
    env.update({k: os.environ[k] for k in _ENV_KEPT if k in os.environ})
    return env


def pip_freeze() -> str:
    """``name==version`` of every installed distribution, sorted."""
    lines = {f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()}
    return "\n".join(sorted(lines)) + "\n"


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested params into MLflow ``a.b.c`` keys with string values (redacted)."""
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): redact(str(obj))[:6000]}


def source_tags(project_dir: Path, stage: str, git: GitInfo) -> dict[str, str]:
    """MLflow's own tags: the run's source (command, git commit, repository) and its user."""
    command = f"openrelease {stage}" if stage in RESERVED_NAMES else f"openrelease launch {stage}"
    tags = {"mlflow.source.name": command, "mlflow.source.type": "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        tags["mlflow.user"] = "unknown"
    if git.commit:
        tags["mlflow.source.git.commit"] = git.commit
    branch = (git_output(project_dir, "rev-parse", "--abbrev-ref", "HEAD") or "").strip()
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    remote = (git_output(project_dir, "remote", "get-url", "origin") or "").strip()
    if remote:
        tags["mlflow.source.git.repoURL"] = redact(remote)
    return tags


def dvc_experiment(project_dir: Path) -> tuple[str | None, dict[str, str]]:
    """The DVC experiment this pipeline runs as (``DVC_EXP_NAME``) and its params overrides.

    Overrides are the params that differ from ``params.yaml`` at the experiment's baseline
    commit (``DVC_EXP_BASELINE_REV``, else ``HEAD``): what ``dvc exp run -S`` changed.
    """
    name = os.environ.get("DVC_EXP_NAME") or None
    rev = os.environ.get("DVC_EXP_BASELINE_REV") or "HEAD"
    path = project_dir / PARAMS
    base = git_output(project_dir, "show", f"{rev}:./{PARAMS}")
    if base is None or not path.is_file():
        return name, {}
    try:
        old = flatten(yaml.safe_load(base) or {})
        new = flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except yaml.YAMLError:
        return name, {}
    changed = {k: v for k, v in sorted(new.items()) if old.get(k) != v}
    return name, changed


def dataset_source(path: str) -> dict[str, str]:
    """How MLflow shows where an input comes from: a local file, a Hub dataset, or generated.

    ``hf://datasets/ORG/NAME[@REV]`` is a Hub dataset; ``synthetic`` the data stage's generator;
    anything else a file relative to the project (never an absolute path, so the record moves
    with the project).
    """
    if path.startswith("hf://"):
        repo = path.removeprefix("hf://").removeprefix("datasets/")
        repo, _, rev = repo.partition("@")
        return {"type": "hugging_face", "path": repo, **({"revision": rev} if rev else {})}
    if path == "synthetic":
        return {"type": "code", "name": "openrelease.data.synthetic"}
    return {"type": "local", "uri": path}


def checkpoint_model_key(project_dir: Path, rel_path: str) -> str | None:
    """The journal key of the LoggedModel of the checkpoint at ``rel_path`` (from its records)."""
    folder = project_dir / rel_path
    try:
        meta = read_model(folder / CHECKPOINT_META, CheckpointMeta)
        record = read_model(Workspace(project_dir).record(meta.stage), StageRecord)
    except (OSError, ValueError):
        return None
    return model_key(record.run_key, meta.step)


def model_key(run_key: str, step: int) -> str:
    """The journal key of a stage run's checkpoint at ``step``."""
    return f"{run_key}:step-{step}"


def pipeline_step(params: PipelineParams, stage: str, step: int) -> int:
    """``step`` of ``stage`` on one axis for the whole pipeline.

    The steps of the earlier stages plus ``step``: pretrain 1..N, then sft N+1.., and so on.
    """
    offset = 0
    for name in params.train_stages:
        if name == stage:
            return offset + step
        offset += params.stage(name).num_steps
    return step


def registered_name(params: PipelineParams, stage: str) -> str:
    """The Model Registry name of a stage's final checkpoint: ``openrelease.<release>-<stage>``.

    MLflow refuses ``/`` in registered model names, so the namespace is joined with a dot.
    """
    return f"openrelease.{params.release.name}-{stage}"
