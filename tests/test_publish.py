"""publish_bundle against the loopback Hub with the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from bundle_factory import make_bundle, write_checkpoint_meta, write_manifest
from hubserver import TOKEN, USER, HubServer
from huggingface_hub import HfApi, RepoFile, constants, hf_hub_download

from openrelease.errors import PublishError
from openrelease.manifest import BundleManifest, read_model
from openrelease.release.publish import PublishReport, publish_bundle

REPO = f"{USER}/tiny-open-llm"


class Interrupted(Exception):
    """Raised by a progress callback to simulate a publish killed half-way."""


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path, num_checkpoints=2, num_sft_checkpoints=1)


def _publish(bundle: Path, hub: HubServer, **kwargs: object) -> PublishReport:
    args: dict[str, object] = {"repo_id": REPO, "endpoint": hub.endpoint, "token": TOKEN}
    return publish_bundle(bundle, **{**args, **kwargs})  # type: ignore[arg-type]


def _where(path: str) -> tuple[str, str, str, str]:
    """Independent statement of the layout: (repo, repo type, revision, path in repo)."""
    parts = path.split("/")
    if parts[0] == "checkpoints":
        return REPO, "model", f"{parts[1]}-{parts[2].replace('-', '')}", "/".join(parts[3:])
    if parts[0] == "model":
        return REPO, "model", "main", "/".join(parts[1:])
    if path in ("data/README.md", "data/croissant.json"):  # the dataset card and Croissant
        return f"{REPO}-data", "dataset", "main", parts[1]
    if parts[0] == "data":
        return f"{REPO}-data", "dataset", "main", path
    return REPO, "model", "main", path


def test_publish_puts_every_file_on_its_branch(
    bundle: Path, hub: HubServer, tmp_path: Path
) -> None:
    report = _publish(bundle, hub, revision_tag="v1")
    assert report.ok, report
    assert not report.extra
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    refs = api.list_repo_refs(REPO)
    branches = {"main", "pretrain-step10", "pretrain-step20", "sft-step10"}
    assert {b.name for b in refs.branches} == branches
    main_head = next(b.target_commit for b in refs.branches if b.name == "main")
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", main_head)]
    assert [t.name for t in api.list_repo_refs(f"{REPO}-data", repo_type="dataset").tags] == ["v1"]

    manifest = read_model(bundle / "MANIFEST.json", BundleManifest)
    for entry in manifest.files:
        repo, repo_type, revision, path = _where(entry.path)
        local = hf_hub_download(
            repo,
            path,
            repo_type=repo_type,
            revision=revision,
            endpoint=hub.endpoint,
            token=TOKEN,
            cache_dir=tmp_path / "cache",
        )
        digest = "sha256:" + hashlib.sha256(Path(local).read_bytes()).hexdigest()
        assert digest == entry.sha256, entry.path
    step = api.list_repo_files(REPO, revision="pretrain-step20")
    assert step == [".gitattributes", "README.md", "config.json", "meta.json", "model.safetensors"]
    (weights,) = api.get_paths_info(REPO, ["model.safetensors"], revision="sft-step10")
    ckpt = next(e for e in manifest.files if e.path == "checkpoints/sft/step-10/model.safetensors")
    assert isinstance(weights, RepoFile) and weights.lfs is not None
    assert "sha256:" + weights.lfs.sha256 == ckpt.sha256
    assert "MANIFEST.json" in api.list_repo_files(REPO)


def test_rerun_changes_nothing(bundle: Path, hub: HubServer) -> None:
    _publish(bundle, hub)
    num_requests = len(hub.log)
    report = _publish(bundle, hub)
    assert report.ok
    assert report.num_uploaded_bytes == 0
    assert all(not t.uploaded and not t.created for t in report.targets)
    assert not any(e.mutating for e in hub.log[num_requests:])


def test_interrupted_publish_uploads_only_the_rest(bundle: Path, hub: HubServer) -> None:
    calls: list[tuple[int, int]] = []

    def stop_after_seven_files(done: int, total: int) -> None:
        calls.append((done, total))
        if len(calls) == 8:  # the first call is (0, total)
            raise Interrupted

    # Every LFS object goes up before any commit: stopped after seven files, no checkpoint
    # branch exists yet and main says the release is incomplete.
    with pytest.raises(Interrupted):
        _publish(bundle, hub, progress=stop_after_seven_files)
    first_puts = {e.path for e in hub.requests("PUT")}
    first_bytes = hub.lfs_bytes_uploaded
    assert first_puts and first_bytes > 0
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    assert {b.name for b in api.list_repo_refs(REPO).branches} == {"main"}
    assert api.list_repo_files(REPO) == [".gitattributes", "PUBLISHING_IN_PROGRESS.md"]
    assert _publish(bundle, hub, dry_run=True).incomplete

    report = _publish(bundle, hub)
    assert report.ok and not report.incomplete
    assert "PUBLISHING_IN_PROGRESS.md" not in api.list_repo_files(REPO)
    second_puts = [e.path for e in hub.requests("PUT")][len(first_puts) :]
    assert not first_puts & set(second_puts), "an LFS object was uploaded twice"
    files = read_model(bundle / "MANIFEST.json", BundleManifest).files
    # model/ is the final checkpoint: the Hub stores (and receives) that LFS object once
    lfs_sizes = {e.sha256: e.size for e in files if e.path.endswith(".safetensors")}
    total_lfs = sum(lfs_sizes.values())
    assert hub.lfs_bytes_uploaded == total_lfs


def test_progress_reports_bytes(bundle: Path, hub: HubServer) -> None:
    calls: list[tuple[int, int]] = []
    report = _publish(bundle, hub, progress=lambda d, t: calls.append((d, t)))
    total = sum(t.num_bytes for t in report.targets)
    assert calls[0] == (0, total)
    assert calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_dry_run_makes_no_state_changing_request(bundle: Path, hub: HubServer) -> None:
    report = _publish(bundle, hub, dry_run=True)
    assert report.dry_run
    assert {e.method for e in hub.log} == {"GET"}
    assert not any(e.mutating for e in hub.log)
    assert not hub.repos
    assert report.num_uploaded_bytes == sum(t.num_bytes for t in report.targets) > 0
    assert {t.revision for t in report.targets if t.created} >= {"main", "sft-step10"}
    assert report.missing  # the remote does not hold the release yet


def test_changed_file_uploads_only_it_and_needs_a_new_tag(bundle: Path, hub: HubServer) -> None:
    _publish(bundle, hub, revision_tag="v1")
    (bundle / "docs" / "report.md").write_text("# Technical report, revised\n")
    write_manifest(bundle)
    with pytest.raises(PublishError, match="tag v1 already exists"):
        _publish(bundle, hub, revision_tag="v1")
    report = _publish(bundle, hub, revision_tag="v2")
    assert report.ok
    uploaded = {(t.revision, p) for t in report.targets for p in t.uploaded}
    assert uploaded == {("main", "docs/report.md"), ("main", "MANIFEST.json")}


@pytest.mark.parametrize(
    "secret",
    [
        "hf_" + "Ab3" * 12,
        # pragma: allowlist nextline secret
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n",
        "aws key AKIA" + "Z7" * 8,
    ],
)
def test_bundle_with_a_secret_is_refused(bundle: Path, hub: HubServer, secret: str) -> None:
    (bundle / "configs" / "params.yaml").write_text(f"seed: 0\nnote: {secret}\n")
    write_manifest(bundle)
    with pytest.raises(PublishError, match=r"configs/params\.yaml contains") as excinfo:
        _publish(bundle, hub)
    assert secret.split()[-1][:12] not in str(excinfo.value)
    assert not hub.log


def test_failing_verify_blocks_publishing(bundle: Path, hub: HubServer) -> None:
    weights = bundle / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PublishError, match="fails verification"):
        _publish(bundle, hub)
    assert not hub.log


def test_audit_below_the_required_class_blocks_publishing(bundle: Path, hub: HubServer) -> None:
    with pytest.raises(PublishError, match="audits as MOF class 3, short of the required class 2"):
        _publish(bundle, hub, require_class=2)
    assert not hub.log
    assert _publish(bundle, hub, require_class=3, dry_run=True).dry_run


def test_hub_errors_are_one_line_without_the_token(bundle: Path, hub: HubServer) -> None:
    bad_token = "hf_" + "Wrong0" * 6
    with pytest.raises(PublishError, match="HTTP 401") as excinfo:
        _publish(bundle, hub, token=bad_token)
    message = str(excinfo.value)
    assert "\n" not in message
    assert bad_token not in message


def test_no_token_is_refused(bundle: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hub.root_dir / "no-token"))
    with pytest.raises(PublishError, match="no Hugging Face token"):
        publish_bundle(bundle, repo_id=REPO, endpoint=hub.endpoint)


@pytest.mark.slow
def test_from_pretrained_loads_a_checkpoint_branch(
    tmp_path: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    bundle = make_bundle(tmp_path / "b", num_checkpoints=1)
    ckpt_dir = bundle / "checkpoints" / "pretrain" / "step-10"
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(ckpt_dir)
    write_checkpoint_meta(ckpt_dir, stage="pretrain", step=10, parent_digest=None)
    for path in ckpt_dir.iterdir():  # model/ is the final checkpoint
        if path.name != "meta.json":
            shutil.copyfile(path, bundle / "model" / path.name)
    write_manifest(bundle)
    assert _publish(bundle, hub).ok

    # transformers goes through huggingface_hub's import-time endpoint constants.
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    template = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        REPO, revision="pretrain-step10", cache_dir=tmp_path / "cache"
    )
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
