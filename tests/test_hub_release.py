"""A trained tiny release as a newcomer finds it on the (loopback) Hub, with the real clients.

One workspace (data, pretrain, sft, eval; in-process, one rank) is bundled for
``openrelease/openrelease-test`` and published to another repo, as `publish --repo-id` does for
anyone: the card's code is run as written, every data role is loaded with `datasets`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hubserver import TOKEN, USER, HubServer, serve_hub
from huggingface_hub import HfApi, constants, hf_hub_download
from project_paths import TEST_PARAMS

from openrelease.layout import HUB_BRANCH, format_tokens
from openrelease.manifest import AllowedSecrets, BundleManifest, HubBranches, read_model
from openrelease.params import load_params
from openrelease.release.bundle import build_bundle
from openrelease.release.publish import PublishReport, publish_bundle
from openrelease.verify.bundle import verify_bundle
from openrelease.verify.hub import verify_hub

pytestmark = pytest.mark.slow
FAKE_KEY = "-----BEGIN " + "RSA PRIVATE KEY-----"
PRAGMA = "<!-- pragma: " + "allowlist secret -->"
REPO = f"{USER}/newcomer-tiny"
"""Not the repo the bundle was built for (openrelease/openrelease-test)."""


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openrelease.data.stage import run_data_stage
    from openrelease.eval.stage import run_eval_stage
    from openrelease.train import run_stage

    project = tmp_path_factory.mktemp("hub-release")
    raw = yaml.safe_load(TEST_PARAMS.read_text())
    # A paper quoting a (fake) key on a marked line: shipped, recorded, listed, not refused.
    raw["release"]["paper"] = "paper.md"
    raw["release"]["allowed_secrets"] = [{"path": "docs/*.tex", "reason": "no such file"}]
    (project / "paper.md").write_text(f"# Paper\n\nExample: `{FAKE_KEY}`  {PRAGMA}\n")
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(project / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        run_data_stage(params, project_dir=project)
        for stage in ("pretrain", "sft"):
            run_stage(stage, params, project_dir=project)
        run_eval_stage(params, project_dir=project)
    out = project / "release"
    build_bundle(project, out, params=params)
    return out


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubServer, Path]]:
    root = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        mp.setenv("HF_HUB_DISABLE_XET", "1")
        mp.setenv("HF_HOME", str(root / "hf_home"))
        mp.delenv("HF_TOKEN", raising=False)
        with serve_hub(root / "server") as server:
            yield server, root


@pytest.fixture(scope="module")
def published(release: Path, hub_home: tuple[HubServer, Path]) -> PublishReport:
    hub, _ = hub_home
    before = (release / "MANIFEST.json").read_bytes()
    report = publish_bundle(release, repo_id=REPO, endpoint=hub.endpoint, token=TOKEN)
    assert report.ok, (report.missing, report.mismatched)
    assert (release / "MANIFEST.json").read_bytes() == before, "publish changed the bundle"
    return report


def _client_env(hub: HubServer, root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(root / "client_home"),
        "HF_DATASETS_CACHE": str(root / "datasets_cache"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def _hub_text(hub: HubServer, root: Path, path: str, *, repo_type: str = "model") -> str:
    repo = REPO if repo_type == "model" else f"{REPO}-data"
    local = hf_hub_download(
        repo, path, repo_type=repo_type, endpoint=hub.endpoint, token=TOKEN,
        cache_dir=root / "read_cache",
    )  # fmt: skip
    return Path(local).read_text(encoding="utf-8")


def test_documents_name_the_repo_they_are_published_to(
    published: PublishReport, hub_home: tuple[HubServer, Path], release: Path
) -> None:
    hub, root = hub_home
    assert published.built_for == "openrelease/openrelease-test"
    assert {"README.md", "mof.yaml", "data/README.md", "MANIFEST.json"} <= set(published.retargeted)
    for path, repo_type in (
        ("README.md", "model"),
        ("mof.yaml", "model"),
        ("README.md", "dataset"),
    ):
        text = _hub_text(hub, root, path, repo_type=repo_type)
        assert REPO in text, path
        assert "openrelease/openrelease-test" not in text, path
    mof = yaml.safe_load(_hub_text(hub, root, "mof.yaml"))
    assert mof["release"]["huggingface"] == f"https://huggingface.co/{REPO}"
    card_meta = yaml.safe_load(_hub_text(hub, root, "README.md").split("---\n")[1])
    assert card_meta["datasets"] == [f"{REPO}-data"]
    # The Hub copy is sealed again: it verifies, and differs from the local bundle's digest.
    report = verify_hub(REPO, endpoint=hub.endpoint, token=TOKEN)
    assert report.ok, report.problems
    local = read_model(release / "MANIFEST.json", BundleManifest)
    remote = BundleManifest.model_validate_json(_hub_text(hub, root, "MANIFEST.json"))
    assert remote.bundle_digest != local.bundle_digest
    assert published.tag == f"release-{remote.bundle_digest.removeprefix('sha256:')[:12]}"
    assert verify_bundle(release).ok  # the local bundle is untouched


def _use_snippet(card: str) -> str:
    use = card.split("## Use", 1)[1]
    match = re.search(r"```python\n(.*?)```", use, re.DOTALL)
    assert match is not None, "no python block in the Use section"
    return match.group(1)


def test_card_use_snippet_runs_as_written(
    published: PublishReport, hub_home: tuple[HubServer, Path]
) -> None:
    hub, root = hub_home
    snippet = _use_snippet(_hub_text(hub, root, "README.md"))
    assert f'"{REPO}"' in snippet
    result = subprocess.run(
        [sys.executable, "-c", snippet],
        env=_client_env(hub, root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The tiny model's text may be blanks; the point is that the code runs to its print.
    assert result.stdout.endswith("\n") and len(result.stdout) > 1, result.stdout


def test_checkpoint_table_and_branches_name_stage_step_and_tokens(
    published: PublishReport, hub_home: tuple[HubServer, Path], release: Path
) -> None:
    hub, root = hub_home
    recorded = read_model(release / "branches.json", HubBranches)
    assert recorded.template == "{stage}-step{step}-tokens{tokens}"
    branches = {b.name for b in HfApi(endpoint=hub.endpoint).list_repo_refs(REPO).branches}
    assert branches == {"main", *recorded.branches.values()}
    card = _hub_text(hub, root, "README.md")
    rows = [line for line in card.splitlines() if line.startswith("| `")]
    assert len(rows) == len(recorded.branches)
    for folder, branch in recorded.branches.items():
        meta = json.loads((release / folder / "meta.json").read_text())
        assert (
            branch
            == f"{meta['stage']}-step{meta['step']}-tokens{format_tokens(meta['tokens_seen'])}"
        )
        match = HUB_BRANCH.fullmatch(branch)
        assert match is not None and int(match["step"]) == meta["step"]
        row = next(r for r in rows if r.startswith(f"| `{branch}` |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:4] == [meta["stage"], str(meta["step"]), f"{meta['tokens_seen']:,}"]
        assert cells[5] != "-", "the checkpoint's eval results are missing from its row"
    order = [r.split("`")[1] for r in rows]
    assert order[0].startswith("pretrain-") and order[-1].startswith("sft-")  # training order


def test_every_data_role_loads_with_datasets(
    published: PublishReport, hub_home: tuple[HubServer, Path], release: Path
) -> None:
    hub, root = hub_home
    card = _hub_text(hub, root, "README.md", repo_type="dataset")
    configs = yaml.safe_load(card.split("---\n")[1])["configs"]
    roles = {c["config_name"] for c in configs}
    manifest = json.loads((release / "data/manifest.json").read_text())
    expected = {r: e["num_records"] for r, e in manifest["datasets"].items() if e["size"]}
    assert roles == set(expected)
    assert "croissant.json" in HfApi(endpoint=hub.endpoint).list_repo_files(
        f"{REPO}-data", repo_type="dataset"
    )
    code = (
        "import json, sys\nfrom datasets import load_dataset\n"
        "out = {}\n"
        "for role in sys.argv[1:]:\n"
        f"    ds = load_dataset({REPO + '-data'!r}, role)\n"
        "    out[role] = {split: len(d) for split, d in ds.items()}\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *sorted(roles)],
        env=_client_env(hub, root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for role, count in expected.items():
        split = "test" if role.startswith("eval") else "train"
        assert loaded[role] == {split: count}, role


def test_allowed_secret_is_recorded_in_the_bundle_and_listed_when_publishing(
    published: PublishReport, release: Path
) -> None:
    recorded = read_model(release / "allowed_secrets.json", AllowedSecrets)
    assert [(r.path, r.reason) for r in recorded.rules] == [("docs/*.tex", "no such file")]
    expected = [("docs/research_paper.md", 3, "a private key", "pragma: allowlist secret")]
    assert [(f.path, f.line, f.what, f.allowed_by) for f in recorded.allowed] == expected
    assert [(f.path, f.line, f.what, f.allowed_by) for f in published.allowed_secrets] == expected
