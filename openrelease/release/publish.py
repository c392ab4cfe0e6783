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
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
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
from openrelease.digest import PREFIX, bare_hex, sha256_bytes, sha256_file, sha256_tree
from openrelease.errors import PublishError
from openrelease.layout import (
    ALLOWED_SECRETS,
    BUNDLE_CHECKPOINT_FILE,
    BUNDLE_MANIFEST,
    CHECKPOINT_META,
    DATASET_CARD,
    HUB_BRANCHES,
    PUBLISH_MARKER,
    STAGING_BRANCH,
    Bundle,
    dataset_repo_path,
)
from openrelease.manifest import (
    AllowedSecretFinding,
    AllowedSecrets,
    BundleManifest,
    CheckpointMeta,
    FileEntry,
    HubBranches,
    dump_json,
    read_model,
)
from openrelease.secrets import ALLOWABLE, AllowRules, scan_files
from openrelease.verify.bundle import (
    bundle_stage_order,
    load_bundle_manifest,
    stage_key,
    verify_bundle,
)
from openrelease.verify.hub import HUB_ERRORS, checkpoint_branch, describe_hub_error
from openrelease.verify.untrusted import read_capped, unsafe_path_reason

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
"""Called with (bytes uploaded so far, total bytes to upload) after each file."""

RepoType = Literal["model", "dataset"]
MAX_RETARGET_BYTES = 64 << 20
MARKER_TEXT = (
    "# Publishing in progress\n\n"
    "openrelease is publishing this release: until this file is gone, `main` may lack files "
    "of it (every checkpoint branch that exists is complete). If it stays, the publish was "
    "interrupted; rerun `openrelease publish` to finish.\n"
).encode()
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
    allowed_secrets: list[AllowedSecretFinding] = []
    """Secret-like matches published on purpose (pragma-marked lines, allowed_secrets rules)."""
    built_for: str | None = None
    """The repo the bundle's documents were built for (mof.yaml), when they name one."""
    retargeted: list[str] = []
    """Bundle files re-rendered for ``repo_id`` (and MANIFEST.json, re-sealed) on the Hub."""
    incomplete: bool = False
    """``main`` holds PUBLISHING_IN_PROGRESS.md: an earlier publish was interrupted (dry run),
    or this one did not finish."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        """True when the Hub holds every planned file with the manifest's sha256."""
        return not self.missing and not self.mismatched and not self.incomplete

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


def check_no_secrets(
    bundle_dir: Path, paths: list[str], rules: AllowRules = ()
) -> list[AllowedSecretFinding]:
    """Refuse a bundle holding secret-like content that nothing marks as allowed.

    That is: HF, GitHub and AWS keys, private keys, and the value of any secret-named
    environment variable (``HF_TOKEN``, ``MY_API_KEY``, ...). Safetensors files are scanned in
    their JSON header only (tensor bytes cannot hold text metadata); other files whole. A
    match of a known shape is allowed where its line (or the line before) carries
    detect-secrets' ``pragma: allowlist secret`` or a ``release.allowed_secrets`` rule covers
    its file; an environment variable's value never is.

    Returns:
        Every allowed match, for the publish plan.

    Raises:
        PublishError: Naming the first file and line with a refused match (never the secret).
    """
    findings = scan_files(bundle_dir, paths, rules)
    if refused := [f for f in findings if f.allowed_by is None]:
        first, more = refused[0], f"; {len(refused) - 1} more" if len(refused) > 1 else ""
        fixture = (
            "; if it is a test fixture, mark the line `# pragma: allowlist secret` or list "
            "the file in release.allowed_secrets with a reason"
            if first.what in ALLOWABLE
            else ""
        )
        raise PublishError(
            f"{first.path} contains what looks like {first.what}; remove it (line "
            f"{first.line}{more}), rebuild the bundle and revoke the secret if it was real"
            f"{fixture}."
        )
    return [
        AllowedSecretFinding(path=f.path, line=f.line, what=f.what, allowed_by=f.allowed_by or "")
        for f in findings
    ]


def allowed_secret_rules(bundle_dir: Path) -> list[tuple[str, str]]:
    """The ``release.allowed_secrets`` rules the bundle recorded (``allowed_secrets.json``)."""
    path = bundle_dir / ALLOWED_SECRETS
    if not path.is_file():
        return []
    record = read_model(path, AllowedSecrets)
    return [(r.path, r.reason) for r in record.rules]


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


def plan_targets(
    bundle_dir: Path,
    manifest: BundleManifest,
    *,
    repo_id: str,
    rewritten: dict[str, bytes] | None = None,
) -> list[_Target]:
    """Map every bundle file to a (repo, revision, path in repo).

    ``model/*`` goes to the root of ``main`` (so ``from_pretrained(repo_id)`` works), each
    ``checkpoints/<stage>/step-<N>/*`` to the root of its branch (branches.json, else
    ``<stage>-step<N>``) with a generated card, ``data/`` to the dataset repo
    ``<repo_id>-data`` (its card and Croissant at the root), everything else to ``main`` as is.
    ``rewritten`` replaces the content of bundle files (see `retarget`).

    Raises:
        PublishError: Two files map to one place, or a checkpoint has no meta.json.
    """
    rewritten = rewritten or {}
    main = _Target(repo_id, "model", "main")
    data = _Target(f"{repo_id}-data", "dataset", "main")
    branches: dict[str, _Target] = {}
    order: dict[str, tuple[int, str, int]] = {}
    stages = bundle_stage_order(bundle_dir)  # the release's own stage order
    metas: dict[str, Path] = {}
    names = recorded_branches(bundle_dir)
    files = [(e.path, e.size, e.sha256) for e in manifest.files]
    bundle = Bundle(bundle_dir)
    signatures = sorted(p for p in bundle.signatures.rglob("*") if p.is_file())
    files += [(p.relative_to(bundle_dir).as_posix(), p.stat().st_size, "") for p in signatures]
    files.append((BUNDLE_MANIFEST, bundle.manifest.stat().st_size, ""))
    for rel, size, sha256 in files:
        local = bundle_dir / rel
        if rel in rewritten:
            content = rewritten[rel]
            item = _Item(rel, len(content), sha256_bytes(content), None, content)
        else:
            item = _Item(rel, size, sha256 or sha256_file(local), local)
        if match := BUNDLE_CHECKPOINT_FILE.fullmatch(rel):
            stage, step = match["stage"], int(match["step"])
            name = checkpoint_branch(stage, step, names)
            target = branches.setdefault(name, _Target(repo_id, "model", name))
            order[name] = (*stage_key(stage, stages), step)
            _add(target, replace(item, path_in_repo=match["rest"]), rel)
            if match["rest"] == CHECKPOINT_META:
                metas[name] = local
        elif rel.startswith("model/"):
            _add(main, replace(item, path_in_repo=rel.removeprefix("model/")), rel)
        elif rel.startswith("data/"):
            _add(data, replace(item, path_in_repo=dataset_repo_path(rel)), rel)
        else:
            _add(main, item, rel)
    license_id = _front_matter_license(bundle_dir / "README.md")
    for name, target in branches.items():
        if name not in metas:
            raise PublishError(f"checkpoint {name} has no meta.json; rebuild the bundle.")
        meta = read_model(metas[name], CheckpointMeta)
        card = checkpoint_card(meta, repo_id=repo_id, branch=name, license_id=license_id)
        content = card.encode()
        readme = _Item("README.md", len(content), sha256_bytes(content), None, content)
        target.items.setdefault("README.md", readme)
    ordered = [branches[k] for k in sorted(branches, key=order.__getitem__)]
    return [*ordered, main, *([data] if data.items else [])]


def recorded_branches(bundle_dir: Path) -> dict[str, str]:
    """``checkpoints/<stage>/step-N`` -> branch, from the bundle's branches.json (or empty)."""
    path = bundle_dir / HUB_BRANCHES
    return read_model(path, HubBranches).branches if path.is_file() else {}


RETARGETED = ("README.md", "mof.yaml", DATASET_CARD, "data/croissant.json", "sbom/bom.cdx.json")
"""The documents that name the release's Hub repos; `retarget` rewrites them."""


def bundle_repo_id(bundle_dir: Path) -> str | None:
    """The model repo the bundle's documents name (mof.yaml's ``release.huggingface``)."""
    path = bundle_dir / "mof.yaml"
    if not path.is_file():
        return None
    doc = yaml.safe_load(read_capped(path, max_bytes=MAX_RETARGET_BYTES))
    release = doc.get("release") if isinstance(doc, dict) else None
    url = release.get("huggingface") if isinstance(release, dict) else None
    match = re.fullmatch(r"https://huggingface\.co/([\w.-]+/[\w.-]+?)/?", str(url or ""))
    return match[1] if match else None


def retarget(
    bundle_dir: Path, manifest: BundleManifest, *, repo_id: str
) -> tuple[BundleManifest, dict[str, bytes]]:
    """The bundle's documents re-rendered for ``repo_id``, and its manifest re-sealed.

    The card, mof.yaml, the dataset card, Croissant and the BOM name the repos they were
    built for (``release.organization/name``); publishing elsewhere rewrites every mention
    of that repo (and of its ``-data`` repo) to ``repo_id``, and MANIFEST.json gets their new
    sha256 and a new bundle digest. The bundle folder itself is not changed.

    Returns:
        The manifest to publish and ``{bundle path: new bytes}`` (empty: nothing to change).

    Raises:
        PublishError: The bundle is signed (a rewrite would break its signatures).
    """
    old = bundle_repo_id(bundle_dir)
    if old is None or old == repo_id:
        return manifest, {}
    mention = re.compile(rf"(?<![\w.-]){re.escape(old)}(?=-data\b|\.(?!\w)|(?![\w.-]))")
    changed: dict[str, bytes] = {}
    for entry in manifest.files:
        if entry.path in RETARGETED:
            text = read_capped(bundle_dir / entry.path, max_bytes=MAX_RETARGET_BYTES).decode()
            if (new := mention.sub(repo_id, text)) != text:
                changed[entry.path] = new.encode()
    if not changed:
        return manifest, {}
    if any(p.is_file() for p in Bundle(bundle_dir).signatures.rglob("*")):
        raise PublishError(
            f"{bundle_dir} names {old} and is signed; publish it with --repo-id {old}, or set "
            f"release.organization/name for {repo_id}, rebuild, sign and publish again."
        )
    files = tuple(
        FileEntry(path=e.path, size=len(changed[e.path]), sha256=sha256_bytes(changed[e.path]))
        if e.path in changed
        else e
        for e in manifest.files
    )
    digest = sha256_tree({e.path: e.sha256 for e in files})
    sealed = manifest.model_copy(update={"files": files, "bundle_digest": digest})
    changed[BUNDLE_MANIFEST] = dump_json(sealed.model_dump(mode="json")).encode()
    return sealed, changed


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


def _ops(items: list[_Item]) -> list[CommitOperationAdd]:
    ops = []
    for item in items:
        op = CommitOperationAdd(item.path_in_repo, item.local or item.content)
        if PREFIX + op.upload_info.sha256.hex() != item.sha256:
            raise PublishError(
                f"{item.local} changed after verification (its sha256 differs from "
                "MANIFEST.json); rebuild the bundle and publish again."
            )
        ops.append(op)
    return ops


def _preupload(
    api: HfApi, target: _Target, items: list[_Item], tick: Callable[[int], None]
) -> None:
    """Send each file's LFS bytes on its own (resumable by sha256) before any commit names it.

    The objects go to the repo (LFS storage is per repo, not per branch); asked against
    ``main``, which always exists. These operations are thrown away: a commit builds its own,
    so the Hub compares them with the branch they go to.
    """
    for item, op in zip(items, _ops(items), strict=True):
        api.preupload_lfs_files(
            target.repo_id, additions=[op], repo_type=target.repo_type, revision="main"
        )
        tick(item.size)


def _commit(
    api: HfApi,
    target: _Target,
    items: list[_Item],
    *,
    revision: str,
    deletions: tuple[str, ...] = (),
) -> str:
    """Commit ``items`` (their LFS objects already stored) to ``revision``; returns the commit."""
    head = api.repo_info(target.repo_id, repo_type=target.repo_type, revision=revision).sha
    ops: list[CommitOperationAdd | CommitOperationDelete] = [*_ops(items)]
    ops += [CommitOperationDelete(path) for path in deletions]
    info = api.create_commit(
        target.repo_id,
        operations=ops,
        commit_message=f"openrelease: publish {len(items)} file(s) to {target.revision}",
        repo_type=target.repo_type,
        revision=revision,
        parent_commit=head,
    )
    return str(info.oid)


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


def _create_repos(api: HfApi, targets: list[_Target], remote: _Remote, *, private: bool) -> None:
    """Create the missing repos (the Hub gives each a ``main`` holding only .gitattributes)."""
    for repo_id, repo_type in {t.repo_id: t.repo_type for t in targets}.items():
        if remote.refs[repo_id] is None:
            api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)


def _delete_staging(api: HfApi, repo_id: str) -> None:
    try:
        api.delete_branch(repo_id, branch=STAGING_BRANCH)
    except RevisionNotFoundError:
        pass  # none left by an interrupted publish


def _new_branch(api: HfApi, target: _Target, items: list[_Item], root: str) -> None:
    """Commit a checkpoint on the staging branch, then create its branch at that commit.

    The Hub cannot commit to a branch that does not exist, and a branch created first would
    point at a commit without the weights; so the branch appears holding all of them at once.
    The staging branch starts at the repo's first commit, so a checkpoint holds only itself.
    """
    _delete_staging(api, target.repo_id)
    api.create_branch(target.repo_id, branch=STAGING_BRANCH, revision=root)
    commit = _commit(api, target, items, revision=STAGING_BRANCH)
    api.create_branch(target.repo_id, branch=target.revision, revision=commit)


def _push(
    api: HfApi, targets: list[_Target], remote: _Remote, *, tag: str, progress: ProgressFn | None
) -> None:
    """Publish what each target lacks without ever showing half a release.

    1. ``main`` gets PUBLISHING_IN_PROGRESS.md (when main will change); 2. every LFS object
    is uploaded; 3. each checkpoint branch gets one commit holding all its files (a new one
    is created at that commit); 4. the dataset repo's and then the model repo's ``main`` get
    one commit each, the last one removing the marker; 5. each repo's main is tagged.
    """
    todo = {t.where: remote.todo(t) for t in targets}
    total, done = sum(i.size for items in todo.values() for i in items), 0

    def tick(num_bytes: int) -> None:
        nonlocal done
        done += num_bytes
        if progress is not None:
            progress(done, total)

    tick(0)
    main = next(t for t in targets if t.repo_type == "model" and t.revision == "main")
    marked = PUBLISH_MARKER in remote.files[main.where]
    if todo[main.where] and not marked:
        marker = _Item(PUBLISH_MARKER, len(MARKER_TEXT), sha256_bytes(MARKER_TEXT), None, MARKER_TEXT)
        _commit(api, main, [marker], revision="main")
        marked = True
    for target in targets:
        _preupload(api, target, todo[target.where], tick)
    roots: dict[str, str] = {}
    staged = False
    for target in (t for t in targets if t.revision != "main"):
        if not (items := todo[target.where]):
            continue
        logger.info("committing %d file(s) to %s", len(items), target.where)
        if target.revision in _names(remote.refs[target.repo_id]):
            _commit(api, target, items, revision=target.revision)
            continue
        if target.repo_id not in roots:
            history = api.list_repo_commits(target.repo_id, repo_type=target.repo_type)
            roots[target.repo_id] = history[-1].commit_id
        _new_branch(api, target, items, roots[target.repo_id])
        staged = True
    if staged:
        _delete_staging(api, main.repo_id)
    for target in sorted((t for t in targets if t.revision == "main"), key=lambda t: t is main):
        items = todo[target.where]
        deletions = (PUBLISH_MARKER,) if target is main and marked else ()
        if items or deletions:
            logger.info("committing %d file(s) to %s", len(items), target.where)
            _commit(api, target, items, revision="main", deletions=deletions)
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
        extra += [
            f"{t.where}:{p}"
            for p in remote
            if p not in t.items and p not in (".gitattributes", PUBLISH_MARKER)
        ]
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
    main = next(t for t in targets if t.repo_type == "model" and t.revision == "main")
    incomplete = PUBLISH_MARKER in after.files[main.where]
    return PublishReport.model_validate(
        {
            **fields,
            "targets": reports,
            "missing": missing,
            "mismatched": mismatched,
            "extra": extra,
            "incomplete": incomplete,
        }
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
    manifest, rewritten = retarget(bundle_dir, manifest, repo_id=repo_id)
    targets = plan_targets(bundle_dir, manifest, repo_id=repo_id, rewritten=rewritten)
    locals_ = [i.local for t in targets for i in t.items.values() if i.local is not None]
    allowed = check_no_secrets(
        bundle_dir,
        [p.relative_to(bundle_dir).as_posix() for p in locals_],
        allowed_secret_rules(bundle_dir),
    )
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
    fields = {
        **_report_fields(api, targets, repo_id, tag),
        "allowed_secrets": allowed,
        "retargeted": sorted(rewritten),
        "built_for": bundle_repo_id(bundle_dir),
    }
    report = _report(targets, before, before, **fields)
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
        _create_repos(api, targets, before, private=private)
        _push(api, targets, before, tag=plan.tag, progress=progress)
        after = _Remote.read(api, targets)
    fields = {
        **_report_fields(api, targets, plan.repo_id, plan.tag),
        "dry_run": False,
        "allowed_secrets": plan.report.allowed_secrets,
        "retargeted": plan.report.retargeted,
        "built_for": plan.report.built_for,
    }
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
