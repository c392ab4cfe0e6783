"""Start training jobs under torchrun in tests, and kill them the way a crash would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
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


def kill_then_resume(
    start: Callable[[Path], subprocess.Popen[bytes]], reference: Path, killed: Path, stage: str
) -> None:
    """Run ``stage`` to the end in ``reference``; in ``killed``, SIGKILL it mid-run and resume.

    The kill comes once ``artifacts/<stage>/metrics.jsonl`` has 3 lines (the state of step 1 is
    published by then: states publish one save late). Afterwards both folders hold finished runs
    and the last torchrun log of ``killed`` says it resumed.
    """
    ref_proc = start(reference)
    proc = start(killed)
    metrics = killed / "artifacts" / stage / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    kill_tree(proc)
    finish_job(ref_proc, reference)
    assert not (killed / "artifacts" / stage / "manifest.json").exists()
    finish_job(start(killed), killed)
    last_log = sorted(killed.glob("torchrun-*.log"))[-1].read_text()
    assert f"resumed {stage} from" in last_log
