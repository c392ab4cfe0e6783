"""Shared fixtures: test params, a data folder built once per session, GPU auto-skip."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hubserver import HubServer, serve_hub
from huggingface_hub import constants
from project_paths import TEST_PARAMS

from openrelease.params import PipelineParams, load_params


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_params() -> PipelineParams:
    """The test recipe (tests/assets/params_test.yaml): every stage runs in seconds."""
    return load_params(TEST_PARAMS)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A loopback Hub server (tests/hubserver.py); HF_TOKEN unset, HF_HOME private."""
    # huggingface_hub reads these at import time: patch the constants, not only the env.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with serve_hub(tmp_path / "hub") as server:
        yield server


@pytest.fixture(scope="session")
def built_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder with params.yaml and the data stage's outputs, built once."""
    from openrelease.data.stage import build_data

    project = tmp_path_factory.mktemp("project")
    shutil.copy(TEST_PARAMS, project / "params.yaml")
    params = load_params(project / "params.yaml")
    build_data(params.data, seed=params.seed, project_dir=project)
    return project


@pytest.fixture(scope="session")
def data_dir(built_project: Path) -> Path:
    """The session's data stage output folder (treat as read-only)."""
    return built_project / "artifacts" / "data"


@pytest.fixture
def project(tmp_path: Path, built_project: Path) -> Iterator[Path]:
    """A private copy of the built project, safe to modify; cwd is set to it."""
    dst = tmp_path / "proj"
    shutil.copytree(built_project, dst)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(dst)
        yield dst


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite store per session (migrations take ~2 s); tests copy it."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path
