"""Start training jobs under torchrun in tests, and kill them the way a crash would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TORCHRUN = Path(sys.executable).parent / "torchrun"


def start_torchrun(
    project: Path, entry_source: str, stage: str, *, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Run ``entry_source`` (a script taking STAGE PARAMS PROJECT) on 2 gloo ranks."""
    entry = project / "entry.py"
    entry.write_text(entry_source)
    env = {**(env or os.environ), "PYTHONPATH": str(Path(__file__).parent.parent)}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(entry), stage]
    log = (project / f"torchrun-{time.monotonic_ns()}.log").open("wb")
    return subprocess.Popen(
        [*cmd, str(project / "params.yaml"), str(project)],
        cwd=project,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def descendants(pid: int) -> list[int]:
    """Every process started, directly or not, by ``pid`` (Linux /proc)."""
    found = []
    for children in Path(f"/proc/{pid}").glob("task/*/children"):
        for child in map(int, children.read_text().split()):
            found += [child, *descendants(child)]
    return found


def kill_tree(proc: subprocess.Popen[bytes], *, timeout: float | None = None) -> None:
    """SIGKILL ``proc`` and all it started, by PID (torchrun puts workers in their own
    sessions, so killing a process group would miss them); reap ``proc``."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=timeout)


def finish_job(proc: subprocess.Popen[bytes], project: Path) -> None:
    """Wait for a torchrun job; fail the test with the tail of its logs unless it exits 0."""
    rc = proc.wait(timeout=180)
    logs = "\n".join(p.read_text() for p in sorted(project.glob("torchrun-*.log")))
    assert rc == 0, logs[-3000:]
