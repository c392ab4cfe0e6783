"""Real DVC on a temp git repo holding a copy of this project."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from project_paths import REPO_ROOT, TEST_PARAMS

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO_ROOT / name, repo / name)
    shutil.copytree(
        REPO_ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache")
    )
    shutil.copytree(
        REPO_ROOT / "openrelease",
        repo / "openrelease",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(TEST_PARAMS, repo / "params.yaml")
    _run(["git", "init", "-q"], repo)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], repo)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], repo)
    return repo


def test_dvc_repro_data_then_noop(repo: Path) -> None:
    dvc = str(Path(sys.executable).parent / "dvc")
    first = _run([dvc, "repro", "data"], repo)
    assert "Running stage 'data'" in first.stdout
    assert (repo / "artifacts/data/manifest.json").exists()
    lock = (repo / "dvc.lock").read_text()
    assert "artifacts/data" in lock and "vocab_size: 320" in lock
    second = _run([dvc, "repro", "data"], repo)
    assert "Running stage" not in second.stdout
    # A params change in the stage's section reruns it.
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("num_stories: 400", "num_stories: 410"))
    third = _run([dvc, "repro", "data"], repo)
    assert "Running stage 'data'" in third.stdout


def _changed(status: str) -> set[str]:
    """The stages `dvc status` lists (lines ``<stage>:`` at the start)."""
    return set(re.findall(r"^([\w-]+):$", status, re.M))


def _ran(stdout: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", stdout))


def test_dvc_repro_whole_pipeline_then_only_what_changed(repo: Path) -> None:
    dvc = str(Path(sys.executable).parent / "dvc")
    first = _run([dvc, "repro"], repo)
    stages = ["data", "pretrain", "sft", "distill", "grpo", "eval", "bundle", "audit"]
    assert _ran(first.stdout) == set(stages)
    audit = json.loads((repo / "audit.json").read_text())
    assert audit["mof_class"] == 1 and audit["verified"]["mof_class"] == 1
    assert (repo / "release/MANIFEST.json").is_file()
    metrics = json.loads((repo / "artifacts/eval/metrics.json").read_text())
    assert set(metrics) == {"pretrain", "sft", "distill", "grpo"}

    assert _ran(_run([dvc, "repro"], repo).stdout) == set()

    # Code deps follow the imports: the module that decides what step N trains on reruns
    # every training stage, the answer extraction reruns eval (and GRPO, whose reward uses it).
    for module, changed in (
        ("data/order.py", {"pretrain", "sft", "distill", "grpo"}),
        ("data/tasks.py", {"pretrain", "sft", "distill", "grpo", "eval", "data"}),
    ):
        path = repo / "openrelease" / module
        original = path.read_text()
        path.write_text(original + "\n# edited\n")
        assert _changed(_run([dvc, "status"], repo).stdout) == changed | {"bundle"}, module
        path.write_text(original)
    assert _changed(_run([dvc, "status"], repo).stdout) == set()

    # A pretrain change reruns pretrain and what depends on it up to the stage asked for.
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("lr: 3.0e-3", "lr: 2.0e-3", 1))
    assert _ran(_run([dvc, "repro", "sft"], repo).stdout) == {"pretrain", "sft"}
    status = _run([dvc, "status"], repo).stdout
    assert "distill:" in status and "data:" not in status
