"""A release project as users get it: `openrelease init` from an installed (non-editable) wheel,
real `dvc repro`, push to a local-folder and an S3 remote (moto's server on 127.0.0.1), clone +
pull, experiments, a code edit, and a moved project folder.

The wheel is built once per session and installed with ``pip install --no-deps --target`` into a
folder put first on PYTHONPATH and PATH, so the project runs that copy, not this source tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from project_paths import REPO_ROOT, TEST_PARAMS

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """openrelease built as a wheel and installed (no deps) into its own folder."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root), str(REPO_ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = root.glob("openrelease-*.whl")
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), wheel],
        check=True,
        capture_output=True,
    )
    assert (target / "openrelease/recipes/tiny.yaml").is_file()
    return target


def _env(installed: Path) -> dict[str, str]:
    path = os.pathsep.join([str(installed / "bin"), str(BIN), os.environ["PATH"]])
    return {
        **os.environ,
        "PATH": path,
        "PYTHONPATH": str(installed),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }


def _run(
    args: list[str], cwd: Path, env: dict[str, str], *, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    if ok:
        assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _ran(stdout: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", stdout))


def _changed(status: str) -> set[str]:
    return set(re.findall(r"^([\w-]+):$", status, re.M))


def _small_params() -> dict[str, object]:
    """The test params, two stages (pretrain, sft), one process, a few steps each."""
    p = yaml.safe_load(TEST_PARAMS.read_text(encoding="utf-8"))
    p["compute"] |= {"launcher": "python", "nproc_per_node": 1}
    p["stages"] = [{"name": "pretrain", "kind": "pretrain"}, {"name": "sft", "kind": "sft"}]
    p["pretrain"] |= {"num_steps": 4, "checkpoint_every": 2, "global_batch_size": 4}
    p["sft"] |= {"num_steps": 2, "checkpoint_every": 2, "global_batch_size": 4}
    p["eval"] |= {"max_examples": 2, "max_new_tokens": 4, "num_samples": 1}
    del p["distill"], p["grpo"]
    return p


@pytest.fixture(scope="module")
def baseline(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A project made by `openrelease init`, run once by `dvc repro` and committed on main."""
    env = _env(installed)
    project = tmp_path_factory.mktemp("baseline") / "proj"
    _run(["openrelease", "init", str(project), "--recipe", "tiny"], project.parent, env)
    (project / "params.yaml").write_text(yaml.safe_dump(_small_params(), sort_keys=False))
    _run(["openrelease", "pipeline", "sync"], project, env)
    _run([*GIT, "add", "-A"], project, env)
    _run([*GIT, "commit", "-qm", "project"], project, env)
    repro = _run(["dvc", "repro"], project, env)
    _run([*GIT, "add", "-A"], project, env)
    _run([*GIT, "commit", "-qm", "baseline"], project, env)
    return project, repro.stdout


@pytest.fixture
def project(baseline: tuple[Path, str], tmp_path: Path) -> Path:
    """A private copy of the baseline project (git, DVC cache and workspace)."""
    dst = tmp_path / "proj"
    shutil.copytree(baseline[0], dst, symlinks=True)
    return dst


def test_init_makes_a_standalone_project(installed: Path, tmp_path: Path) -> None:
    env = _env(installed)
    project = tmp_path / "mine"
    _run(["openrelease", "init", str(project), "--recipe", "gpu-1b"], tmp_path, env)
    for name in ("params.yaml", "dvc.yaml", ".gitignore", ".dvc/config", "README.md"):
        assert (project / name).is_file(), name
    assert (project / ".git").is_dir()
    assert 'type = "hardlink,reflink,symlink,copy"' in (project / ".dvc/config").read_text()
    dvc_yaml = (project / "dvc.yaml").read_text()
    deps = [d for s in yaml.safe_load(dvc_yaml)["stages"].values() for d in s.get("deps", [])]
    assert str(REPO_ROOT) not in dvc_yaml
    assert not [d for d in deps if d.startswith("openrelease")]  # nothing in the tool's tree
    code = json.loads((project / ".openrelease/code.json").read_text())
    assert code["digest"].startswith("sha256:") and code["version"]
    _run(["openrelease", "pipeline", "check"], project, env)
    # A non-empty folder is refused; so is an unknown recipe.
    again = _run(["openrelease", "init", str(project)], tmp_path, env, ok=False)
    assert again.returncode == 1 and "is not an empty folder" in again.stderr
    bad = _run(
        ["openrelease", "init", str(tmp_path / "x"), "--recipe", "no"], tmp_path, env, ok=False
    )
    assert bad.returncode == 1 and "unknown recipe 'no'; choose one of: " in bad.stderr

    # params and dvc.yaml disagree: one line naming the difference, exit 1; sync fixes it.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["stages"] = [
        {"name": "pretrain", "kind": "pretrain"},
        {"name": "sft", "kind": "sft"},
        {"name": "sft2", "kind": "sft", "from": "sft"},
    ]
    params["sft2"] = dict(params["sft"])
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    check = _run(["openrelease", "pipeline", "check"], project, env, ok=False)
    assert check.returncode == 1
    assert check.stderr.strip().splitlines() == [
        "error: dvc.yaml and params.yaml disagree: stage 'sft2' is missing (params.yaml has it); "
        "run `openrelease pipeline sync` (then `dvc repro`)."
    ]
    # Every stage checks at its start, so `dvc repro` cannot run a stale pipeline.
    data = _run(["openrelease", "data"], project, env, ok=False)
    assert data.returncode == 1 and "stage 'sft2' is missing" in data.stderr
    _run(["openrelease", "pipeline", "sync"], project, env)
    _run(["openrelease", "pipeline", "check"], project, env)
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["data", "pretrain", "sft", "sft2", "eval", "bundle", "audit"]
    assert "artifacts/sft/manifest.json" in stages["sft2"]["deps"]


def test_a_stage_list_runs_exactly_those_stages(baseline: tuple[Path, str]) -> None:
    project, stdout = baseline
    assert _ran(stdout) == {"data", "pretrain", "sft", "eval", "bundle", "audit"}
    assert sorted(p.name for p in (project / "artifacts").iterdir()) == [
        "audit",
        "data",
        "eval",
        "pretrain",
        "sft",
    ]
    assert json.loads((project / "artifacts/audit/metrics.json").read_text()) == {"mof_class": 1}
    metrics = json.loads((project / "artifacts/eval/metrics.json").read_text())
    assert set(metrics) == {"pretrain", "sft"}
    assert sorted(p.name for p in (project / "artifacts/eval/curves").iterdir()) == [
        "pretrain.csv",
        "sft.csv",
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def s3_server() -> Iterator[str]:
    """moto's S3-compatible server on 127.0.0.1 (a real process speaking the S3 protocol)."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.2)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _clone_and_check(origin: Path, dst: Path, env: dict[str, str]) -> None:
    """git clone + dvc pull: clean status, verify passes, lineage works, summary truthful."""
    _run(["git", "clone", "-q", str(origin), str(dst)], origin.parent, env)
    summary = json.loads(_run(["openrelease", "summary", "--json"], dst, env).stdout)
    assert not any(s["done"] for s in summary["stages"]), "nothing is done before the pull"
    _run(["dvc", "pull"], dst, env)
    assert _changed(_run(["dvc", "status"], dst, env).stdout) == set()
    _run(["openrelease", "verify", "release"], dst, env)
    _run(["openrelease", "lineage", "artifacts/sft/checkpoints/step-2"], dst, env)
    summary = json.loads(_run(["openrelease", "summary", "--json"], dst, env).stdout)
    assert all(s["done"] for s in summary["stages"]), summary
    original = origin / "artifacts/sft/checkpoints/step-2/model.safetensors"
    assert _hash(dst / "artifacts/sft/checkpoints/step-2/model.safetensors") == _hash(original)


def test_push_then_clone_and_pull_from_a_folder_and_from_s3(
    project: Path, installed: Path, tmp_path: Path, s3_server: str
) -> None:
    env = _env(installed)
    _run(["dvc", "remote", "add", "-d", "folder", str(tmp_path / "remote")], project, env)
    _run([*GIT, "commit", "-qam", "folder remote"], project, env)
    _run(["dvc", "push"], project, env)
    pushed = [p for p in (tmp_path / "remote").rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in pushed)
    weights = sum(
        p.stat().st_size for p in (project / "artifacts").rglob("*.safetensors") if p.is_file()
    )
    assert size >= weights > 0  # every checkpoint travels
    _clone_and_check(project, tmp_path / "clone-folder", env)

    s3_env = {
        **env,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    _run(
        [
            sys.executable,
            "-c",
            "import boto3, sys; boto3.client('s3', endpoint_url=sys.argv[1])"
            ".create_bucket(Bucket='release')",
            s3_server,
        ],
        project,
        s3_env,
    )
    _run(["dvc", "remote", "add", "-d", "s3", "s3://release/store"], project, s3_env)
    _run(["dvc", "remote", "modify", "s3", "endpointurl", s3_server], project, s3_env)
    _run([*GIT, "commit", "-qam", "s3 remote"], project, s3_env)
    _run(["dvc", "push"], project, s3_env)
    _clone_and_check(project, tmp_path / "clone-s3", s3_env)


def test_an_experiment_never_destroys_the_baseline(project: Path, installed: Path) -> None:
    env = _env(installed)
    ckpt = project / "artifacts/sft/checkpoints/step-2/model.safetensors"
    before = _hash(ckpt)
    exp = _run(["dvc", "exp", "run", "-n", "lr-up", "-S", "sft.lr=3e-3"], project, env)
    assert _ran(exp.stdout) == {"sft", "eval", "bundle", "audit"}
    assert _hash(ckpt) != before
    record = json.loads((project / "artifacts/sft/record.json").read_text())
    assert record["git"]["dirty"] is False
    assert record["git"]["experiment"] == "lr-up"
    assert record["git"]["overrides"] == {"sft.lr": "0.003"}

    show = json.loads(_run(["dvc", "exp", "show", "--json"], project, env).stdout)
    text = json.dumps(show)
    assert text.count('"sft"') >= 2 and "lr-up" in text  # metrics of main and the experiment
    diff = _run(["dvc", "metrics", "diff", "main", "--json"], project, env).stdout
    assert "sft.heldout_loss" in diff or '"sft"' in diff
    _run(["dvc", "plots", "diff", "main", "--json"], project, env)

    _run(["git", "checkout", "-q", "main", "--", "."], project, env)
    _run(["dvc", "checkout", "--force"], project, env)
    assert _hash(ckpt) == before
    assert _changed(_run(["dvc", "status"], project, env).stdout) == set()


def test_a_code_edit_shows_dvc_every_stage_changed(project: Path, installed: Path) -> None:
    env = _env(installed)
    tasks = installed / "openrelease/data/tasks.py"
    original = tasks.read_text()
    try:
        tasks.write_text(original + "\n# edited\n")
        check = _run(["openrelease", "pipeline", "check"], project, env, ok=False)
        assert check.returncode == 1 and "is not the code .openrelease/code.json names" in (
            check.stderr
        )
        _run(["openrelease", "pipeline", "sync"], project, env)
        status = _run(["dvc", "status"], project, env).stdout
        assert _changed(status) == {"data", "pretrain", "sft", "eval", "bundle", "audit"}
    finally:
        tasks.write_text(original)
    _run(["openrelease", "pipeline", "sync"], project, env)
    assert _changed(_run(["dvc", "status"], project, env).stdout) == set()


def test_a_moved_project_keeps_working_and_names_no_old_path(
    project: Path, installed: Path, tmp_path: Path
) -> None:
    env = _env(installed)
    moved = tmp_path / "elsewhere" / "proj"
    moved.parent.mkdir()
    shutil.move(project, moved)
    old = str(project)
    checked = [
        *moved.glob("artifacts/*/record.json"),
        *(moved / ".openrelease/journal").rglob("journal.jsonl"),
        *(p for p in (moved / "release/logs").rglob("*") if p.is_file()),
        *(moved / "artifacts/eval/samples").glob("*.jsonl"),
    ]
    assert len(checked) > 6
    leaks = [str(p.relative_to(moved)) for p in checked if old in p.read_text(errors="replace")]
    assert leaks == []
    assert _changed(_run(["dvc", "status"], moved, env).stdout) == set()
    _run(["openrelease", "verify", "release"], moved, env)
    _run(["openrelease", "lineage", "sft"], moved, env)
