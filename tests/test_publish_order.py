"""Publish never shows half a release: kill -9 mid-publish, on the loopback Hub.

Every state-changing request the Hub answers is followed by a check of what a user would see
at that moment: a checkpoint branch without its weights, or a ``main`` whose files are partial
without the in-progress marker, is a violation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hubserver
import pytest
from bundle_factory import make_bundle
from hubserver import TOKEN, USER, HubServer

from openrelease.errors import ArtifactError
from openrelease.layout import HUB_BRANCH, PUBLISH_MARKER, STAGING_BRANCH, WEIGHTS
from openrelease.release.publish import publish_bundle
from openrelease.verify.hub import verify_hub

REPO = f"{USER}/killed"


def half_shown(hub: HubServer) -> list[str]:
    """What a user would see half-published right now (call with the server lock held)."""
    found = []
    for (repo_type, repo_id), repo in hub.repos.items():
        if repo_type != "model":
            continue
        for name, oid in repo.branches.items():
            files = repo.commits[oid].files
            if name == "main":
                only_init = set(files) == {".gitattributes"}  # a repo just created: empty
                if not (only_init or PUBLISH_MARKER in files or WEIGHTS in files):
                    found.append(f"{repo_id}@main has partial files and no marker")
            elif name != STAGING_BRANCH and HUB_BRANCH.fullmatch(name) and WEIGHTS not in files:
                found.append(f"{repo_id}@{name} lacks {WEIGHTS}")
    return found


@pytest.fixture
def watched(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Violations seen after any POST/PUT/DELETE the Hub answered."""
    violations: list[str] = []

    def wrap(original: Callable[[Any], None]) -> Callable[[Any], None]:
        def handle(self: Any) -> None:
            original(self)
            with hub.lock:
                violations.extend(half_shown(hub))

        return handle

    for method in ("do_POST", "do_PUT", "do_DELETE"):
        handler = hubserver._Handler
        monkeypatch.setattr(handler, method, wrap(getattr(handler, method)))
    return violations


def _count(hub: HubServer, kind: str) -> int:
    if kind == "lfs":
        return len(hub.requests("PUT", "/lfs/"))
    # checkpoint branches created (not the staging branch)
    return sum(
        1
        for e in hub.requests("POST", f"/api/models/{REPO}/branch/")
        if e.status == 200 and STAGING_BRANCH not in e.path
    )


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "after"), [("lfs", 3), ("branches", 3)])
def test_kill_9_mid_publish_shows_no_half_release_and_a_rerun_completes(
    tmp_path: Path, hub: HubServer, watched: list[str], kind: str, after: int
) -> None:
    bundle = make_bundle(tmp_path, num_checkpoints=4, num_sft_checkpoints=3)
    env = {
        **os.environ,
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    args = [sys.executable, "-m", "openrelease", "publish", str(bundle), "--repo-id", REPO]
    proc = subprocess.Popen(
        [*args, "--endpoint", hub.endpoint, "--yes"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while _count(hub, kind) < after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.kill()
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == -9, f"publish ended before the kill: {stderr.decode()[-2000:]}"

    with hub.lock:
        assert half_shown(hub) == []
    repo = hub.repos[("model", REPO)]
    assert PUBLISH_MARKER in repo.commits[repo.branches["main"]].files  # says: incomplete
    with pytest.raises(ArtifactError, match="incomplete: a publish was interrupted"):
        verify_hub(REPO, endpoint=hub.endpoint, token=TOKEN)

    report = publish_bundle(bundle, repo_id=REPO, endpoint=hub.endpoint, token=TOKEN)
    assert report.ok and not report.incomplete, (report.missing, report.mismatched)
    assert verify_hub(REPO, endpoint=hub.endpoint, token=TOKEN).ok
    assert STAGING_BRANCH not in repo.branches
    assert watched == [], watched[:5]
