"""Run the real CLI and check that a failure is clean; snapshot folders to prove no writes."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import stat
from pathlib import Path
from typing import Any

from typer.testing import CliRunner, Result

from openrelease.cli import app

runner = CliRunner()


class _RunsCode:
    """Unpickling this runs ``touch <path>``: a stand-in for a malicious pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def hostile_pickle(touched: Path) -> bytes:
    """A pickle whose loading runs ``touch touched``: the file exists afterwards iff it ran."""
    return pickle.dumps(_RunsCode(touched))


Snapshot = dict[str, tuple[str, int, int]]
"""{relative path: (kind, size, mtime_ns)}; kind is file, dir or link."""


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run ``openrelease ARGS`` in-process, as a user would type it."""
    return runner.invoke(app, list(args), env=env)


def assert_no_crash(result: Result) -> None:
    """No exception escaped the CLI and nothing looks like a crash report."""
    escaped = result.exception
    assert escaped is None or isinstance(escaped, SystemExit), repr(escaped)
    assert "Traceback" not in result.output, result.output
    assert "internal error" not in result.output, result.output


def assert_clean_error(result: Result, *, match: str, code: int = 1) -> str:
    """The command exited ``code`` with exactly one stderr line, ``error: ...`` matching.

    Returns the error line.
    """
    assert result.exit_code == code, result.output
    assert_no_crash(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    assert re.search(match, lines[0]), (match, lines[0])
    return lines[0]


def snapshot(root: Path) -> Snapshot:
    """Every entry under ``root``, symlinks not followed."""
    entries: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                entries[path.relative_to(root).as_posix()] = ("link", info.st_size, 0)
            elif stat.S_ISDIR(info.st_mode):
                entries[path.relative_to(root).as_posix()] = ("dir", 0, 0)
            else:
                entry = ("file", info.st_size, info.st_mtime_ns)
                entries[path.relative_to(root).as_posix()] = entry
    return entries


def changed_files(before: Snapshot, after: Snapshot) -> list[str]:
    """Files and links created, changed or deleted between two snapshots (folders ignored)."""
    out = []
    for path in sorted(set(before) | set(after)):
        old, new = before.get(path), after.get(path)
        if old == new or all(e is None or e[0] == "dir" for e in (old, new)):
            continue
        out.append(path)
    return out


def copy_bundle(pristine: Path, dest: Path) -> Path:
    """A private copy of a pristine bundle, at ``dest/release``."""
    target = dest / "release"
    shutil.copytree(pristine, target, symlinks=True)
    return target
