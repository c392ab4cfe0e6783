"""Pinned reads from the Hugging Face Hub: models, tokenizers and datasets, checked byte by byte.

A source is named ``hf:ORG/NAME@REVISION``. The revision is resolved to a commit sha (a branch or
tag is refused unless the caller allows floating revisions), the file list comes from the Hub's
tree API at that commit, and every downloaded file is checked against the Hub's own digest
before anything reads it: the LFS sha256 for LFS files, the git blob sha1 for the others. A
local folder is pinned by the sha256 of its files. The result is a `PinnedSource` record.

The endpoint is ``HF_ENDPOINT`` (default https://huggingface.co); ``HF_TOKEN`` reaches private
repos through huggingface_hub's own token lookup.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from openrelease.digest import hash_folder, sha256_file, sha256_tree
from openrelease.errors import ArtifactError, ParamsError
from openrelease.manifest import FileEntry, PinnedSource

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


@dataclass(frozen=True)
class HubSpec:
    """A parsed ``hf:ORG/NAME@REVISION``."""

    repo: str
    revision: str


@dataclass(frozen=True)
class RemoteFile:
    """One file of a Hub commit as the tree API lists it."""

    path: str
    size: int
    git_oid: str
    """The git blob sha1 (of the LFS pointer for LFS files)."""
    lfs_sha256: str | None
    """The LFS object's sha256 (bare hex); None for a file stored in git."""


@dataclass(frozen=True)
class HubSnapshot:
    """A repo at one commit: what `resolve` found."""

    repo: str
    repo_type: str
    revision: str
    commit: str
    files: tuple[RemoteFile, ...]


def is_hub_spec(spec: str) -> bool:
    """True for ``hf:...`` (a Hub source), False for a local folder."""
    return spec.startswith(HF_PREFIX)


def parse_hub_spec(spec: str, *, what: str) -> HubSpec:
    """Split ``hf:ORG/NAME@REVISION``; a malformed spec is a `ParamsError` naming ``what``."""
    repo, sep, revision = spec.removeprefix(HF_PREFIX).partition("@")
    if not _REPO_ID.fullmatch(repo) or not sep or not revision.strip():
        raise ParamsError(
            f"{what}: {spec!r} is not hf:ORG/NAME@REVISION; write e.g. "
            f"hf:{repo if _REPO_ID.fullmatch(repo) else 'ORG/NAME'}@<40-hex commit sha>."
        )
    return HubSpec(repo=repo, revision=revision)


def is_repo_id(repo: str) -> bool:
    """True for a well-formed ``ORG/NAME`` (safe as two path segments)."""
    return _REPO_ID.fullmatch(repo) is not None and ".." not in repo


def is_commit(revision: str) -> bool:
    """True when ``revision`` is a full 40-hex commit sha (immutable)."""
    return _COMMIT.fullmatch(revision) is not None


def endpoint() -> str:
    """The Hub endpoint: ``HF_ENDPOINT``, else https://huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def check_revision(repo: str, revision: str, *, allow_floating: bool, what: str) -> None:
    """Refuse a branch or tag (it can move) unless ``allow_floating``."""
    if not is_commit(revision) and not allow_floating:
        raise ParamsError(
            f"{what}: revision {revision!r} of {repo} is a branch or tag, which can move; pin "
            "its 40-hex commit sha, or set allow_floating_revision: true to record the "
            "commit it resolves to now."
        )


def resolve(
    repo: str, revision: str, *, repo_type: str, allow_floating: bool, what: str
) -> HubSnapshot:
    """Resolve ``revision`` to a commit and list the commit's files with the Hub's digests.

    Raises:
        ParamsError: A floating revision without ``allow_floating``.
        ArtifactError: The repo or revision does not exist, or the Hub cannot be reached.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    check_revision(repo, revision, allow_floating=allow_floating, what=what)
    api = HfApi(endpoint=endpoint())
    with _hub_errors(f"{what}: {repo}@{revision}"):
        info = api.repo_info(repo, revision=revision, repo_type=repo_type)
        commit = str(info.sha)
        entries = list(
            api.list_repo_tree(repo, revision=commit, repo_type=repo_type, recursive=True)
        )
    if is_commit(revision) and commit != revision:
        raise ArtifactError(
            f"{what}: the Hub resolved {repo}@{revision} to another commit {commit}; check the sha."
        )
    if not is_commit(revision):
        logger.warning("%s: floating revision %r of %s is commit %s", what, revision, repo, commit)
    files = tuple(
        RemoteFile(
            path=e.path,
            size=int(e.size),
            git_oid=str(e.blob_id),
            lfs_sha256=str(e.lfs.sha256) if e.lfs is not None else None,
        )
        for e in entries
        if isinstance(e, RepoFile)
    )
    return HubSnapshot(repo, repo_type, revision, commit, files)


@contextmanager
def _hub_errors(where: str) -> Iterator[None]:
    """Turn huggingface_hub's errors into one-line `ArtifactError`s naming the source."""
    import httpx2
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except RepositoryNotFoundError:
        msg = f"not found on {endpoint()} (a private repo needs HF_TOKEN); check the name"
        raise ArtifactError(f"{where}: {msg}.") from None
    except RevisionNotFoundError:
        raise ArtifactError(f"{where}: no such revision; check the commit sha.") from None
    except EntryNotFoundError:
        raise ArtifactError(f"{where}: a listed file is missing; check the revision.") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, httpx2.TransportError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        msg = f"the Hub at {endpoint()} failed ({first}); check HF_ENDPOINT and retry"
        raise ArtifactError(f"{where}: {msg}.") from None


def resolve_spec(spec: str, *, repo_type: str, allow_floating: bool, what: str) -> HubSnapshot:
    """`parse_hub_spec` then `resolve`: the commit and files ``hf:ORG/NAME@REVISION`` names."""
    parsed = parse_hub_spec(spec, what=what)
    return resolve(
        parsed.repo,
        parsed.revision,
        repo_type=repo_type,
        allow_floating=allow_floating,
        what=what,
    )


def select(snapshot: HubSnapshot, patterns: tuple[str, ...]) -> tuple[RemoteFile, ...]:
    """The files of ``snapshot`` matching any of the glob ``patterns`` (fnmatch on the path)."""
    return tuple(f for f in snapshot.files if any(fnmatch.fnmatchcase(f.path, p) for p in patterns))


def _git_oid(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check(local: Path, remote: RemoteFile, *, where: str, dest: Path) -> FileEntry:
    """Refuse ``local`` unless it has the Hub's digest for ``remote``; return its entry."""
    digest = sha256_file(local)
    if remote.lfs_sha256 is not None:
        ok, got, want = digest == f"sha256:{remote.lfs_sha256}", digest, remote.lfs_sha256
        what = "sha256", "the Hub's LFS metadata"
    else:
        got = _git_oid(local)
        ok, want = got == remote.git_oid, remote.git_oid
        what = "git blob sha1", "the Hub's tree"
    if not ok:
        raise ArtifactError(
            f"{where}: {remote.path} has {what[0]} {got.removeprefix('sha256:')[:16]}... but "
            f"{what[1]} says {want[:16]}...; refusing a tampered file (delete {dest} and retry).",
            path=str(local),
        )
    return FileEntry(path=remote.path, size=local.stat().st_size, sha256=digest)


def fetch(
    snapshot: HubSnapshot, files: tuple[RemoteFile, ...], *, dest: Path, what: str
) -> tuple[FileEntry, ...]:
    """Download ``files`` of ``snapshot`` into ``dest`` and check each against the Hub's digest.

    Returns:
        Each file's path, size and sha256 (the order of ``files``).

    Raises:
        ArtifactError: A file does not match its Hub digest, or the download failed.
    """
    from huggingface_hub import hf_hub_download

    where = f"{what}: {snapshot.repo}@{snapshot.commit[:12]}"
    dest.mkdir(parents=True, exist_ok=True)
    entries = []
    for remote in files:
        with _hub_errors(where):
            local = hf_hub_download(
                snapshot.repo,
                remote.path,
                revision=snapshot.commit,
                repo_type=snapshot.repo_type,
                local_dir=dest,
                endpoint=endpoint(),
            )
        entries.append(_check(Path(local), remote, where=where, dest=dest))
    return tuple(entries)


def pin_hub(
    snapshot: HubSnapshot, entries: tuple[FileEntry, ...], *, license: str | None = None
) -> PinnedSource:
    """The `PinnedSource` of files fetched from ``snapshot``."""
    return PinnedSource(
        kind="hf",
        repo=snapshot.repo,
        repo_type="dataset" if snapshot.repo_type == "dataset" else "model",
        revision=snapshot.revision,
        commit=snapshot.commit,
        files=entries,
        digest=sha256_tree({e.path: e.sha256 for e in entries}),
        license=license,
    )


def pin_local(folder: Path, *, rel: str, what: str) -> PinnedSource:
    """Pin a local folder by the sha256 of every file in it.

    Raises:
        ArtifactError: ``folder`` is not a folder.
    """
    if not folder.is_dir():
        raise ArtifactError(
            f"{what}: {rel} is not a folder; give a local transformers folder or "
            "hf:ORG/NAME@REVISION.",
            path=rel,
        )
    digests = {p: d for p, d in hash_folder(folder).items() if not p.startswith(".")}
    entries = tuple(
        FileEntry(path=p, size=(folder / p).stat().st_size, sha256=d)
        for p, d in sorted(digests.items())
    )
    return PinnedSource(
        kind="local",
        repo=rel,
        revision=None,
        commit=None,
        files=entries,
        digest=sha256_tree(digests),
    )


def card_license(path: Path) -> str | None:
    """The ``license:`` of a README's YAML front matter (a Hub card), or None."""
    import yaml

    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    front = text[3:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(front)
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if isinstance(value, str | int) else None
