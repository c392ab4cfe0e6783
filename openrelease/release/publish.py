"""Publish a verified release bundle to the Hugging Face Hub -> PublishReport (no torch).

Final model on ``main``, each checkpoint on branch ``<stage>-step<N>``, data in ``<name>-data``;
a rerun uploads only what the remote lacks (by LFS sha256). The token is never logged.
`plan_publish` verifies the bundle and reads the remote once; `execute_publish` uploads that
plan; `publish_bundle` does both.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol

import yaml
from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import GitRefs, RepoFile
from huggingface_hub.utils.tqdm import (
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
)
from pydantic import BaseModel, ConfigDict, computed_field

from openrelease import __version__
from openrelease.audit.report import audit_folder
from openrelease.digest import PREFIX, bare_hex, sha256_bytes, sha256_file
from openrelease.errors import PublishError
from openrelease.layout import BUNDLE_CHECKPOINT_FILE, BUNDLE_MANIFEST, CHECKPOINT_META, Bundle
from openrelease.manifest import BundleManifest, CheckpointMeta, read_model
from openrelease.secrets import find_secret, refusal_patterns
from openrelease.verify.bundle import load_bundle_manifest, verify_bundle
from openrelease.verify.hub import HUB_ERRORS, describe_hub_error
from openrelease.verify.untrusted import unsafe_path_reason

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
"""Called with (bytes uploaded so far, total bytes to upload) after each file."""

RepoType = Literal["model", "dataset"]
_SCAN_CHUNK, _SCAN_OVERLAP, _MAX_HEADER = 1 << 20, 4096, 100 << 20
_HINTS = {
    403: "the token cannot write to this namespace; use a token with write access",
    404: "the repo or revision does not exist or is not visible with this token",
}


class VerifyResult(Protocol):
    """What publishing needs from a verify report: whether the bundle passed."""

    @property
    def ok(self) -> bool:
        """True when the bundle passed."""
        ...


VerifyFn = Callable[[Path], VerifyResult]


class TargetReport(BaseModel):
    """One (repo, revision) of the release: what it holds and what was (or would be) sent."""

    model_config = ConfigDict(frozen=True)

    repo_id: str
    repo_type: RepoType
    revision: str
    num_files: int
    num_bytes: int
    uploaded: list[str]
    """Paths in the repo that were uploaded (in a dry run: that would be)."""
    num_uploaded_bytes: int
    created: bool
    """The repo or branch did not exist before (in a dry run: would be created)."""


class PublishReport(BaseModel):
    """Result of `publish_bundle`: every target and any remote difference from the manifest."""

    repo_id: str
    dataset_repo_id: str | None
    endpoint: str
    tag: str
    dry_run: bool
    targets: list[TargetReport]
    missing: list[str]
    """``repo@revision:path`` planned but absent on the Hub after publishing."""
    mismatched: list[str]
    """``repo@revision:path`` present on the Hub with another sha256 or size."""
    extra: list[str]
    """``repo@revision:path`` on the Hub but not in the release (left alone)."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        """True when the Hub holds every planned file with the manifest's sha256."""
        return not self.missing and not self.mismatched

    @computed_field  # type: ignore[prop-decorator]
    @property
    def num_uploaded_bytes(self) -> int:
        """Bytes uploaded (or to upload) over all targets."""
        return sum(t.num_uploaded_bytes for t in self.targets)


@dataclass(frozen=True)
class _Item:
    """One file to place in a repo: a bundle file or generated content (a checkpoint card)."""

    path_in_repo: str
    size: int
    sha256: str
    local: Path | None
    content: bytes = b""

    def git_oid(self) -> str:
        data = self.local.read_bytes() if self.local else self.content
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Target:
    repo_id: str
    repo_type: RepoType
    revision: str
    items: dict[str, _Item] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.repo_id}@{self.revision}"


# --------------------------------------------------------------------------- checks


def check_no_secrets(bundle_dir: Path, paths: list[str]) -> None:
    """Refuse a bundle holding secret-like content.

    That is: HF, GitHub and AWS keys, private keys, and the value of any secret-named
    environment variable (``HF_TOKEN``, ``MY_API_KEY``, ...). Safetensors files are scanned in
    their JSON header only (tensor bytes cannot hold text metadata); other files whole.

    Raises:
        PublishError: Naming the first file with secret-like content (never the secret).
    """
    patterns = refusal_patterns()
    for rel in paths:
        path = bundle_dir / rel
        with path.open("rb") as f:
            if rel.endswith(".safetensors"):
                header_size = min(int.from_bytes(f.read(8), "little"), _MAX_HEADER)
                chunks: Iterator[bytes] = iter([f.read(header_size)])
            else:
                chunks = iter(lambda: f.read(_SCAN_CHUNK), b"")
            tail = b""
            for chunk in chunks:
                window, tail = tail + chunk, (tail + chunk)[-_SCAN_OVERLAP:]
                if (what := find_secret(window, patterns)) is not None:
                    raise PublishError(
                        f"{rel} contains what looks like {what}; remove it, rebuild the "
                        "bundle and revoke the secret if it was real."
                    )


def _verified_manifest(
    bundle_dir: Path, verify: VerifyFn, require_class: int | None
) -> BundleManifest:
    manifest = load_bundle_manifest(bundle_dir)
    if not verify(bundle_dir).ok:
        raise PublishError(
            f"{bundle_dir} fails verification; run `openrelease verify {bundle_dir}` and fix "
            "the problems it lists before publishing."
        )
    if require_class is not None:
        audit = audit_folder(bundle_dir, check_hashes=False)  # verify just hashed every file
        if not audit.meets(require_class):
            raise PublishError(
                f"{bundle_dir} audits as MOF class {audit.mof_class or 'none'}, short of the "
                f"required class {require_class}; see `openrelease audit {bundle_dir}`."
            )
    for entry in manifest.files:
        if reason := unsafe_path_reason(entry.path):
            raise PublishError(f"MANIFEST.json path {entry.path!r} {reason}; rebuild the bundle.")
    return manifest


# --------------------------------------------------------------------------- plan


def _front_matter_license(readme: Path) -> str | None:
    if not readme.is_file():
        return None
    parts = readme.read_text(encoding="utf-8").split("---\n")
    if len(parts) < 3 or parts[0]:
        return None
    meta = yaml.safe_load(parts[1])
    license_id = meta.get("license") if isinstance(meta, dict) else None
    return license_id if isinstance(license_id, str) else None


def checkpoint_card(
    meta: CheckpointMeta, *, repo_id: str, branch: str, license_id: str | None
) -> str:
    """Return the short model card placed on a checkpoint branch."""
    header = f"license: {license_id}\n" if license_id else ""
    return (
        f"---\n{header}library_name: transformers\ntags:\n- openrelease\n- checkpoint\n---\n"
        f"# {repo_id} - {meta.stage} step {meta.step}\n\n"
        f"Intermediate checkpoint of [{repo_id}](../main): stage `{meta.stage}`, step "
        f"{meta.step}, {meta.tokens_seen} tokens seen, loss {meta.loss}.\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", revision="{branch}")\n```\n\n'
        f"Checkpoint digest `{meta.checkpoint_digest}`; parent `{meta.parent_digest}`. "
        "`meta.json` lists every file with its sha256.\n"
    )


def _add(target: _Target, item: _Item, source: str) -> None:
    if item.path_in_repo in target.items:
        raise PublishError(
            f"{source} and another bundle file both map to {target.where}:{item.path_in_repo}; "
            "rename one of them and rebuild the bundle."
        )
    target.items[item.path_in_repo] = item


def plan_targets(bundle_dir: Path, manifest: BundleManifest, *, repo_id: str) -> list[_Target]:
    """Map every bundle file to a (repo, revision, path in repo).

    ``model/*`` goes to the root of ``main`` (so ``from_pretrained(repo_id)`` works), each
    ``checkpoints/<stage>/step-<N>/*`` to the root of branch ``<stage>-step<N>`` with a generated
    card, ``data/`` to the dataset repo ``<repo_id>-data``, everything else to ``main`` as is.

    Raises:
        PublishError: Two files map to one place, or a checkpoint has no meta.json.
    """
    main = _Target(repo_id, "model", "main")
    data = _Target(f"{repo_id}-data", "dataset", "main")
    branches: dict[str, _Target] = {}
    metas: dict[str, Path] = {}
    files = [(e.path, e.size, e.sha256) for e in manifest.files]
    bundle = Bundle(bundle_dir)
    signatures = sorted(p for p in bundle.signatures.rglob("*") if p.is_file())
    files += [(p.relative_to(bundle_dir).as_posix(), p.stat().st_size, "") for p in signatures]
    files.append((BUNDLE_MANIFEST, bundle.manifest.stat().st_size, ""))
    for rel, size, sha256 in files:
        local = bundle_dir / rel
        item = _Item(rel, size, sha256 or sha256_file(local), local)
        if match := BUNDLE_CHECKPOINT_FILE.fullmatch(rel):
            name = f"{match['stage']}-step{int(match['step'])}"
            target = branches.setdefault(name, _Target(repo_id, "model", name))
            _add(target, replace(item, path_in_repo=match["rest"]), rel)
            if match["rest"] == CHECKPOINT_META:
                metas[name] = local
        elif rel.startswith("model/"):
            _add(main, replace(item, path_in_repo=rel.removeprefix("model/")), rel)
        else:
            _add(data if rel.startswith("data/") else main, item, rel)
    license_id = _front_matter_license(bundle_dir / "README.md")
    for name, target in branches.items():
        if name not in metas:
            raise PublishError(f"checkpoint {name} has no meta.json; rebuild the bundle.")
        meta = read_model(metas[name], CheckpointMeta)
        card = checkpoint_card(meta, repo_id=repo_id, branch=name, license_id=license_id)
        content = card.encode()
        readme = _Item("README.md", len(content), sha256_bytes(content), None, content)
        target.items.setdefault("README.md", readme)
    ordered = [branches[k] for k in sorted(branches, key=_branch_key)]
    return [*ordered, main, *([data] if data.items else [])]


def _branch_key(name: str) -> tuple[int, str, int]:
    stage, _, step = name.rpartition("-step")
    order = ("pretrain", "sft", "distill", "grpo")
    return (order.index(stage) if stage in order else len(order), stage, int(step))


# --------------------------------------------------------------------------- Hub calls


@contextmanager
def _hub_errors(what: str, *, token: str | None) -> Iterator[None]:
    """Turn Hub and transport errors into one-line PublishErrors without the token."""

    def clean(text: str) -> str:
        return text.replace(token, "***") if token else text

    try:
        yield
    except HUB_ERRORS as exc:
        detail, hint = describe_hub_error(exc)
        status = exc.response.status_code if isinstance(exc, HfHubHTTPError) else None
        hint = _HINTS.get(status or 0, hint)
        if status is None or status == 429 or status >= 500:
            hint += " (a re-run resumes where publishing stopped)"
        verb = "Hub refused" if status is not None else "cannot reach the Hub for"
        raise PublishError(f"{verb} {what} ({clean(detail)}); {clean(hint)}.") from None


@contextmanager
def _quiet_hub_progress() -> Iterator[None]:
    """Silence huggingface_hub's per-file bars: the CLI draws one byte bar for the publish."""
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _refs(api: HfApi, repo_id: str, repo_type: RepoType) -> GitRefs | None:
    try:
        return api.list_repo_refs(repo_id, repo_type=repo_type)
    except RepositoryNotFoundError:
        return None


def _remote_files(api: HfApi, target: _Target) -> dict[str, RepoFile]:
    try:
        tree = api.list_repo_tree(
            target.repo_id, recursive=True, revision=target.revision, repo_type=target.repo_type
        )
        return {f.path: f for f in tree if isinstance(f, RepoFile)}
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return {}


def _matches(item: _Item, remote: RepoFile | None) -> bool:
    if remote is None or remote.size != item.size:
        return False
    if remote.lfs is not None:
        return bool(remote.lfs.sha256 == bare_hex(item.sha256))
    return bool(remote.blob_id == item.git_oid())


def _upload(api: HfApi, target: _Target, items: list[_Item], tick: Callable[[int], None]) -> None:
    """Send each file's LFS bytes on its own (resumable by sha256), then commit them at once."""
    head = api.repo_info(target.repo_id, repo_type=target.repo_type, revision=target.revision).sha
    ops = []
    for item in items:
        op = CommitOperationAdd(item.path_in_repo, item.local or item.content)
        if PREFIX + op.upload_info.sha256.hex() != item.sha256:
            raise PublishError(
                f"{item.local} changed after verification (its sha256 differs from "
                "MANIFEST.json); rebuild the bundle and publish again."
            )
        api.preupload_lfs_files(
            target.repo_id, additions=[op], repo_type=target.repo_type, revision=target.revision
        )
        ops.append(op)
        tick(item.size)
    api.create_commit(
        target.repo_id,
        operations=ops,
        commit_message=f"openrelease: publish {len(ops)} file(s) to {target.revision}",
        repo_type=target.repo_type,
        revision=target.revision,
        parent_commit=head,
    )


@dataclass
class _Remote:
    """What the Hub holds: refs per repo (None: no such repo) and files per target."""

    refs: dict[str, GitRefs | None]
    files: dict[str, dict[str, RepoFile]]

    @classmethod
    def read(cls, api: HfApi, targets: list[_Target]) -> _Remote:
        repos = {t.repo_id: t.repo_type for t in targets}
        refs = {repo_id: _refs(api, repo_id, repo_type) for repo_id, repo_type in repos.items()}
        present = {t.where for t in targets if t.revision in _names(refs[t.repo_id])}
        files = {t.where: _remote_files(api, t) if t.where in present else {} for t in targets}
        return cls(refs, files)

    def todo(self, target: _Target) -> list[_Item]:
        remote = self.files[target.where]
        return [i for i in target.items.values() if not _matches(i, remote.get(i.path_in_repo))]

    def ref(self, repo_id: str, name: str, *, tag: bool = False) -> str | None:
        refs = self.refs[repo_id]
        found = (refs.tags if tag else refs.branches) if refs else []
        return next((r.target_commit for r in found if r.name == name), None)


def _names(refs: GitRefs | None) -> set[str]:
    return {b.name for b in refs.branches} if refs else set()


def _check_tag(remote: _Remote, targets: list[_Target], tag: str) -> None:
    """A tag already on the Hub must point at main as this bundle leaves it."""
    for target in (t for t in targets if t.revision == "main"):
        tagged = remote.ref(target.repo_id, tag, tag=True)
        if tagged and (tagged != remote.ref(target.repo_id, "main") or remote.todo(target)):
            raise PublishError(
                f"tag {tag} already exists on {target.repo_id} for other content; pass another "
                "--tag for this release."
            )


def _create_refs(api: HfApi, targets: list[_Target], remote: _Remote, *, private: bool) -> None:
    """Create missing repos (the Hub gives each a ``main``) and checkpoint branches."""
    created: set[str] = set()
    roots: dict[str, str] = {}
    for t in targets:
        if remote.refs[t.repo_id] is None and t.repo_id not in created:
            api.create_repo(t.repo_id, repo_type=t.repo_type, private=private, exist_ok=True)
            created.add(t.repo_id)
        if t.revision != "main" and t.revision not in _names(remote.refs[t.repo_id]):
            # Branch off the repo's first commit so a checkpoint branch holds only itself.
            if t.repo_id not in roots:
                history = api.list_repo_commits(t.repo_id, repo_type=t.repo_type)
                roots[t.repo_id] = history[-1].commit_id
            api.create_branch(
                t.repo_id, branch=t.revision, revision=roots[t.repo_id], repo_type=t.repo_type
            )


def _push(
    api: HfApi, targets: list[_Target], remote: _Remote, *, tag: str, progress: ProgressFn | None
) -> None:
    """Upload what each target lacks, reporting bytes, then tag each repo's main."""
    todo = {t.where: remote.todo(t) for t in targets}
    total, done = sum(i.size for items in todo.values() for i in items), 0

    def tick(num_bytes: int) -> None:
        nonlocal done
        done += num_bytes
        if progress is not None:
            progress(done, total)

    tick(0)
    for target in targets:
        if items := todo[target.where]:
            logger.info("uploading %d file(s) to %s", len(items), target.where)
            _upload(api, target, items, tick)
    for target in (t for t in targets if t.revision == "main"):
        if remote.ref(target.repo_id, tag, tag=True) is None:
            api.create_tag(target.repo_id, tag=tag, revision="main", repo_type=target.repo_type)


def _report(
    targets: list[_Target], before: _Remote, after: _Remote, **fields: object
) -> PublishReport:
    missing, mismatched, extra, reports = [], [], [], []
    for t in targets:
        remote, todo = after.files[t.where], before.todo(t)
        for path, item in t.items.items():
            if path not in remote:
                missing.append(f"{t.where}:{path}")
            elif not _matches(item, remote[path]):
                mismatched.append(f"{t.where}:{path}")
        extra += [f"{t.where}:{p}" for p in remote if p not in t.items and p != ".gitattributes"]
        reports.append(
            TargetReport(
                repo_id=t.repo_id,
                repo_type=t.repo_type,
                revision=t.revision,
                num_files=len(t.items),
                num_bytes=sum(i.size for i in t.items.values()),
                uploaded=[i.path_in_repo for i in todo],
                num_uploaded_bytes=sum(i.size for i in todo),
                created=t.revision not in _names(before.refs[t.repo_id]),
            )
        )
    return PublishReport.model_validate(
        {**fields, "targets": reports, "missing": missing, "mismatched": mismatched, "extra": extra}
    )


# --------------------------------------------------------------------------- entry points


def _require_token(token: str | None) -> None:
    if token is None:
        raise PublishError("no Hugging Face token; set HF_TOKEN or run `hf auth login`.")


@dataclass(frozen=True)
class PublishPlan:
    """A verified bundle mapped onto its Hub targets, with what the Hub held when planned.

    `plan_publish` makes one; `execute_publish` uploads it. ``report`` is the dry-run view:
    every target and what would be uploaded.
    """

    report: PublishReport
    repo_id: str
    tag: str
    token: str | None = field(repr=False)
    api: HfApi = field(repr=False)
    targets: list[_Target] = field(repr=False)
    remote: _Remote = field(repr=False)


def _report_fields(api: HfApi, targets: list[_Target], repo_id: str, tag: str) -> dict[str, object]:
    has_data = targets[-1].repo_type == "dataset"
    return {
        "repo_id": repo_id,
        "endpoint": api.endpoint,
        "tag": tag,
        "dry_run": True,
        "dataset_repo_id": f"{repo_id}-data" if has_data else None,
    }


def plan_publish(
    bundle_dir: Path,
    *,
    repo_id: str,
    endpoint: str | None = None,
    token: str | None = None,
    revision_tag: str | None = None,
    verify: VerifyFn = verify_bundle,
    require_class: int | None = None,
    require_token: bool = True,
) -> PublishPlan:
    """Verify a bundle once, read the remote once, and plan what publishing would upload.

    Makes no state-changing request. Arguments are those of `publish_bundle`; with
    ``require_token=False`` (a dry run, or a plan shown before asking) a missing token is
    refused only by `execute_publish`.

    Raises:
        PublishError: The bundle fails verification or holds a secret, no token is available
            (when required), or the Hub refused a read (one line, without the token).
    """
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise PublishError(f"repo id {repo_id!r} is not ORG/NAME; pass --repo-id ORG/NAME.")
    manifest = _verified_manifest(bundle_dir, verify, require_class)
    targets = plan_targets(bundle_dir, manifest, repo_id=repo_id)
    locals_ = [i.local for t in targets for i in t.items.values() if i.local is not None]
    check_no_secrets(bundle_dir, [p.relative_to(bundle_dir).as_posix() for p in locals_])
    token = token or get_token()
    if require_token:
        _require_token(token)
    api = HfApi(
        endpoint=endpoint, token=token, library_name="openrelease", library_version=__version__
    )
    tag = revision_tag or f"release-{bare_hex(manifest.bundle_digest)[:12]}"
    with _hub_errors("reading the remote repos", token=token):
        before = _Remote.read(api, targets)
    _check_tag(before, targets, tag)
    report = _report(targets, before, before, **_report_fields(api, targets, repo_id, tag))
    return PublishPlan(report, repo_id, tag, token, api, targets, before)


def execute_publish(
    plan: PublishPlan, *, private: bool = False, progress: ProgressFn | None = None
) -> PublishReport:
    """Upload what the plan found missing, tag each repo's main, and read the result back.

    Args:
        plan: From `plan_publish`.
        private: Create missing repos as private (existing repos keep their visibility).
        progress: Optional callback ``(bytes uploaded, bytes to upload)`` after each file.

    Returns:
        Every target with what was uploaded, and any remaining difference from the manifest.

    Raises:
        PublishError: No token is available, or the Hub refused a request (one line, without
            the token).
    """
    _require_token(plan.token)
    api, targets, before = plan.api, plan.targets, plan.remote
    with _hub_errors(f"publishing to {plan.repo_id}", token=plan.token), _quiet_hub_progress():
        _create_refs(api, targets, before, private=private)
        _push(api, targets, before, tag=plan.tag, progress=progress)
        after = _Remote.read(api, targets)
    fields = {**_report_fields(api, targets, plan.repo_id, plan.tag), "dry_run": False}
    return _report(targets, before, after, **fields)


def publish_bundle(
    bundle_dir: Path,
    *,
    repo_id: str,
    endpoint: str | None = None,
    token: str | None = None,
    private: bool = False,
    revision_tag: str | None = None,
    dry_run: bool = False,
    verify: VerifyFn = verify_bundle,
    require_class: int | None = None,
    progress: ProgressFn | None = None,
) -> PublishReport:
    """Publish a release bundle to the Hub; a rerun uploads only what the remote lacks.

    `plan_publish`, then (unless ``dry_run``) `execute_publish`.

    Args:
        bundle_dir: The release folder (MANIFEST.json at its root).
        repo_id: ``ORG/NAME`` of the model repo; data goes to ``ORG/NAME-data``.
        endpoint: Hub URL; defaults to ``HF_ENDPOINT`` or huggingface.co.
        token: Hub token; defaults to ``HF_TOKEN`` or the saved ``hf auth login`` token.
        private: Create missing repos as private (existing repos keep their visibility).
        revision_tag: Tag put on ``main`` of each repo; defaults to ``release-<bundle digest>``.
        dry_run: Read the remote and return the plan without any state-changing request.
        verify: Check run first; publishing refuses a bundle whose report is not ``ok``.
        require_class: Refuse a bundle whose MOF audit class is weaker (1 is the strictest).
        progress: Optional callback ``(bytes uploaded, bytes to upload)`` after each file.

    Returns:
        Every target with what was uploaded, and any remaining difference from the manifest.

    Raises:
        PublishError: The bundle fails verification or holds a secret, no token is available,
            or the Hub refused a request (one line, without the token).
    """
    plan = plan_publish(
        bundle_dir,
        repo_id=repo_id,
        endpoint=endpoint,
        token=token,
        revision_tag=revision_tag,
        verify=verify,
        require_class=require_class,
        require_token=not dry_run,
    )
    if dry_run:
        return plan.report
    return execute_publish(plan, private=private, progress=progress)
