"""The declared minimum versions of the core dependencies really run verify, audit and publish.

A fresh virtual environment gets every core dependency at its floor (``name==min`` from
pyproject.toml) and openrelease without deps; the Hub-facing tests then run in it. Skipped when
the floors cannot be installed (no package index reachable).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from project_paths import REPO_ROOT

NO_INDEX = re.compile(
    r"Failed to establish a new connection|Temporary failure in name resolution|"
    r"Network is unreachable|No route to host|ProxyError|offline"
)
FLOOR_TESTS = (
    "tests/test_publish.py",
    "tests/test_verify_hub.py",
    "tests/test_branch_integrity.py",
)


def floor_pins() -> list[str]:
    """``name==min`` for every core dependency of pyproject.toml that has a ``>=`` floor."""
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = []
    for dep in deps:
        match = re.fullmatch(r"([A-Za-z0-9_.\[\]-]+)\s*>=\s*([0-9][^,;\s]*).*", dep)
        assert match is not None, f"core dependency {dep!r} has no >= floor"
        pins.append(f"{match[1]}=={match[2]}")
    return pins


def test_every_core_dependency_has_a_floor() -> None:
    pins = floor_pins()
    assert any(p.startswith("huggingface_hub==2.") for p in pins), pins
    assert "httpx2==2.0" in pins  # verify/hub.py imports it directly


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_hub_tests_pass_with_the_floor_versions(tmp_path: Path) -> None:
    venv = tmp_path / "floors"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    test_deps = ["pytest>=8.3", "pytest-timeout>=2.3"]
    installed = subprocess.run(
        [*pip, *floor_pins(), *test_deps], capture_output=True, text=True, timeout=1200
    )
    if installed.returncode != 0:
        if NO_INDEX.search(installed.stderr):
            pytest.skip("the floor versions cannot be installed here (no package index)")
        pytest.fail(f"the floor versions do not install together:\n{installed.stderr[-3000:]}")
    subprocess.run([*pip, "--no-deps", "-e", str(REPO_ROOT)], check=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         "-m", "not slow", *FLOOR_TESTS],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    ran = re.search(r"(\d+) passed", result.stdout)
    assert ran is not None and int(ran[1]) >= 20, result.stdout[-2000:]
    versions = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import huggingface_hub as h; print(h.__version__)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert versions.stdout.strip() == "2.0.0"
