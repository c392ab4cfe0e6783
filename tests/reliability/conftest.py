"""The reliability suite's hooks and fixtures; CLI assertions live in cli_checks.py.

Every test under tests/reliability/ gets the ``reliability`` marker (``pytest -m reliability``).
Shared fixtures (``hub``, ``project``, ``tiny_params``) and helpers (``hubserver``,
``bundle_factory``) come from tests/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bundle_factory import make_bundle

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.reliability)


@pytest.fixture(scope="session")
def pristine_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid bundle built once (tests/bundle_factory.py); copy it, never change it."""
    return make_bundle(tmp_path_factory.mktemp("pristine"), num_checkpoints=2)


@pytest.fixture
def cwd_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from the test's tmp folder, so a stray relative write shows up in its snapshot."""
    monkeypatch.chdir(tmp_path)
