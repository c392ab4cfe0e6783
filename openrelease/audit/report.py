"""Audit a release's MOF openness: what mof.yaml claims vs what the files show -> AuditReport.

Targets: a release folder, a MOT YAML file, or a Hub repo (listings only; no weights read).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoFile
from pydantic import BaseModel, ValidationError, computed_field

from openrelease.audit.evidence import (
    MAX_JSON_BYTES,
    MAX_TEXT_BYTES,
    FileStat,
    LicenseStatement,
    ReleaseFiles,
    check_consistency,
    check_manifest,
    fallback_license,
    find_evidence,
    has_license_text,
    license_statements,
    read_card,
    walk_folder,
)
from openrelease.audit.mof import (
    UNLICENSED,
    Component,
    MofScore,
    MotDocument,
    Status,
    load_mot_yaml,
    mof_components,
    mof_release_yaml,
    parse_mot_yaml,
    resolve_licenses,
    score_licenses,
)
from openrelease.digest import PREFIX
from openrelease.errors import ArtifactError, OpenReleaseError
from openrelease.layout import BUNDLE_MANIFEST, HUB_BRANCH
from openrelease.manifest import BundleManifest
from openrelease.verify.bundle import Problem
from openrelease.verify.hub import (
    DATA,
    HUB_ERRORS,
    branch_problems,
    describe_hub_error,
    hub_locations,
    probe_endpoint,
)
from openrelease.verify.untrusted import read_capped

ROMAN = {1: "I", 2: "II", 3: "III"}
_HUB_READABLE = re.compile(
    r"(readme\.md|mof\.ya?ml|manifest\.json|(model/)?config\.json|(licen[cs]e|copying)[^/]*"
    r"|licenses/[^/]+|(.*/)?croissant[^/]*\.json)",
    re.IGNORECASE,
)
"""The only files a Hub audit downloads (and only when small and not in LFS)."""


class AuditRow(BaseModel):
    """One MOF component: claimed (mof.yaml) and verified (evidence), with MOT's status."""

    component: str
    mof_class: int
    required: bool
    claimed: bool
    claimed_status: Status | None
    """MOT's status from mof.yaml; None when the release has no mof.yaml."""
    verified: bool | None
    """Evidence found and sound; None when only a description was audited."""
    verified_status: Status | None
    license: str | None
    evidence: list[str]
    """Up to 20 evidence paths (``branch:<name>`` and links for non-file evidence)."""
    num_evidence: int
    problem: str | None


class AuditReport(BaseModel):
    """Result of an audit; ``mof_class`` is the verified class (claimed for a bare MOT YAML)."""

    target: str
    kind: Literal["folder", "mot_yaml", "hub"]
    name: str | None
    version: str | None = None
    producer: str | None = None
    claimed: MofScore | None
    verified: MofScore | None
    rows: list[AuditRow]
    licenses: list[LicenseStatement]
    problems: list[Problem]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        """True when no problem is an error (warnings allowed)."""
        return not any(p.severity == "error" for p in self.problems)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def mof_class(self) -> int:
        """The class that counts: verified when evidence was audited, else claimed (0: none)."""
        score = self.verified or self.claimed
        return score.mof_class if score is not None else 0

    def meets(self, required: int) -> bool:
        """True when ``mof_class`` is ``required`` (1, 2 or 3) or a stricter class."""
        return 0 < self.mof_class <= required

    def to_markdown(self) -> str:
        """The report as Markdown (for a PR comment or a model card section)."""
        lines = [f"## MOF audit of `{self.target}`", ""]
        for label, score in (("Claimed", self.claimed), ("Verified", self.verified)):
            if score is not None:
                lines.append(
                    f"- **{label}:** {score.label} (III {score.class_iii:.1f}%, "
                    f"II {score.class_ii:.1f}%, I {score.class_i:.1f}%)"
                )
        lines += ["", "| component | class | claimed | verified | license | evidence | problem |"]
        lines.append("|---|---|---|---|---|---|---|")
        for r in self.rows:
            more = f" (+{r.num_evidence - 1})" if r.num_evidence > 1 else ""
            evidence = f"`{r.evidence[0]}`{more}" if r.evidence else ""
            cells = [r.component, ROMAN[r.mof_class], r.claimed_status or "-"]
            cells += [r.verified_status or "-", r.license or "", evidence, r.problem or ""]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        if self.problems:
            lines += ["", "### Problems", ""]
            lines += [f"- {p.severity}: `{p.path or '-'}` {p.message}" for p in self.problems]
        return "\n".join(lines) + "\n"

    def to_mof_yaml(self, *, producer: str | None = None, version: str | None = None) -> str:
        """A MOT YAML description of the verified components (claimed ones for a MOT YAML).

        ``producer`` and ``version`` default to what the audited mof.yaml says.
        """
        done = [r for r in self.rows if r.verified or (r.verified is None and r.claimed)]
        return mof_release_yaml(
            name=self.name or "unnamed",
            version=version or self.version or "",
            producer=producer or self.producer or "unknown",
            components={r.component: r.license for r in done},
            paths={r.component: r.evidence[0] for r in done if r.evidence},
        )


def _read_mof(rel: ReleaseFiles) -> MotDocument | None:
    path = next((p for p in ("mof.yaml", "mof.yml") if p in rel.files), None)
    if path is None:
        return None
    try:
        text = rel.text(path)
        return parse_mot_yaml(text, source=path) if text is not None else None
    except OpenReleaseError as exc:  # oversized, unreadable, bad YAML or off-schema
        rel.add("mof_yaml", path, str(exc))
        return None


def _row(
    rel: ReleaseFiles,
    comp: Component,
    *,
    doc: MotDocument | None,
    card: dict[str, Any],
    stmts: list[LicenseStatement],
) -> tuple[AuditRow, str | None]:
    """One component's row, and its license for verified scoring (None: no sound evidence)."""
    entry = {c.name: c for c in doc.release.components}.get(comp.name) if doc else None
    claimed_path = entry.component_path if entry is not None else None
    ev = find_evidence(rel, comp.id, claimed_path=claimed_path, card=card)
    lic = resolve_licenses(doc).get(comp.id) if doc is not None else None
    lic = lic or fallback_license(doc, comp.content_type, stmts)
    sound = bool(ev.paths) and not ev.broken
    problems = ev.notes + ev.broken
    counted: str | None = None
    if sound:
        counted = lic
        if lic != UNLICENSED and not has_license_text(lic, stmts):
            counted = UNLICENSED  # a license whose text is nowhere in the release is not evidenced
            problems.append(f"no text of {lic} in the release (add LICENSES/{lic}.txt)")
    for p in problems:
        rel.add("evidence", ev.paths[0] if ev.paths else None, f"{comp.name}: {p}")
    if entry is not None and not ev.paths:
        problems.append("claimed in mof.yaml but no evidence found")
        rel.add("claim_without_evidence", "mof.yaml", f"claims {comp.name!r}; no evidence found.")
    row = AuditRow(
        component=comp.name,
        mof_class=comp.mof_class,
        required=comp.required,
        claimed=entry is not None,
        claimed_status=None,
        verified=sound,
        verified_status=None,
        license=lic if ev.paths or entry is not None else None,
        evidence=ev.paths[:20],
        num_evidence=len(ev.paths),
        problem="; ".join(problems) or None,
    )
    return row, counted


def _audit(rel: ReleaseFiles, *, name: str) -> AuditReport:
    card = read_card(rel) if "README.md" in rel.files else {}
    doc = _read_mof(rel)
    stmts = license_statements(rel, doc, card)
    resolved = resolve_licenses(doc) if doc is not None else {}
    rows: list[AuditRow] = []
    counted: dict[str, str] = {}
    licenses: dict[str, str] = {}
    for comp in mof_components():
        row, lic = _row(rel, comp, doc=doc, card=card, stmts=stmts)
        rows.append(row)
        licenses[comp.id] = row.license or UNLICENSED
        if lic is not None:
            counted[comp.id] = lic
    check_consistency(rel, licenses, stmts)
    claimed = score_licenses(resolved) if doc is not None else None
    verified = score_licenses(counted)
    for i, row in enumerate(rows):
        row.verified_status = verified.components[i].status
        row.claimed_status = claimed.components[i].status if claimed is not None else None
    return AuditReport(
        target=rel.target,
        kind=rel.kind,
        name=doc.release.name if doc is not None else name,
        version=doc.release.version if doc is not None else None,
        producer=doc.release.producer if doc is not None else None,
        claimed=claimed,
        verified=verified,
        rows=rows,
        licenses=stmts,
        problems=rel.problems,
    )


# --------------------------------------------------------------------------- entry points


def audit_folder(folder: Path, *, check_hashes: bool = True) -> AuditReport:
    """Audit a release folder (ours or anyone's) from the evidence in it.

    Args:
        folder: The release root.
        check_hashes: Hash every file MANIFEST.json lists (sizes are always compared).

    Returns:
        Claimed and verified MOF scores, per-component rows, license statements, problems.

    Raises:
        ArtifactError: ``folder`` is not a folder or holds an absurd number of files.
    """
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not a folder; pass a release folder.", path=str(folder))

    def read(path: str, max_bytes: int) -> bytes:
        return read_capped(folder / path, max_bytes=max_bytes)

    rel = ReleaseFiles(str(folder), "folder", read, readable=lambda path: True)
    walk_folder(folder, rel)
    check_manifest(rel, root=folder, check_hashes=check_hashes)
    return _audit(rel, name=folder.resolve().name)


def audit_mot_yaml(path: Path) -> AuditReport:
    """Score a MOT YAML description exactly as MOT does (claims only; nothing to verify).

    Raises:
        ArtifactError: The file is unreadable, oversized or not valid MOT YAML.
    """
    doc = load_mot_yaml(path)
    score = score_licenses(resolve_licenses(doc))
    paths = {c.name: c.component_path for c in doc.release.components if c.component_path}
    listed = {c.name for c in doc.release.components}
    rows = [
        AuditRow(
            component=c.component,
            mof_class=c.mof_class,
            required=c.required,
            claimed=c.component in listed,
            claimed_status=c.status,
            verified=None,
            verified_status=None,
            license=c.license,
            evidence=[paths[c.component]] if c.component in paths else [],
            num_evidence=int(c.component in paths),
            problem=None,
        )
        for c in score.components
    ]
    return AuditReport(
        target=str(path),
        kind="mot_yaml",
        name=doc.release.name,
        version=doc.release.version,
        producer=doc.release.producer,
        claimed=score,
        verified=None,
        rows=rows,
        licenses=[],
        problems=[],
    )


def _hub_files(
    api: HfApi, repo_id: str, revision: str | None, *, repo_type: str = "model"
) -> dict[str, FileStat]:
    return {
        item.path: FileStat(
            item.size, PREFIX + item.lfs.sha256 if item.lfs else None, item.lfs is not None
        )
        for item in api.list_repo_tree(
            repo_id, recursive=True, revision=revision, repo_type=repo_type
        )
        if isinstance(item, RepoFile)
    }


Where = tuple[str, str, str]
"""(repo type, revision, path in repo) of a bundle file that `publish` moved."""


def _published_paths(
    api: HfApi,
    repo_id: str,
    files: dict[str, FileStat],
    manifest_bytes: bytes,
) -> dict[str, tuple[Where, FileStat]]:
    """Bundle path -> where `publish` put it, for release files not at their bundle path.

    ``model/*`` is at the root of main and ``data/*`` in ``<repo>-data``; checkpoint branches
    are evidence by themselves (`verify hf:` checks their files).
    """
    try:
        manifest = BundleManifest.model_validate_json(manifest_bytes)
    except ValidationError:
        return {}  # check_manifest reports it
    data: dict[str, FileStat] = {}
    if any(e.path.startswith("data/") and e.path not in files for e in manifest.files):
        try:
            data = _hub_files(api, f"{repo_id}-{DATA}", None, repo_type="dataset")
        except HUB_ERRORS:
            data = {}
    out: dict[str, tuple[Where, FileStat]] = {}
    for e in manifest.files:
        if e.path in files:
            continue
        for where, path in hub_locations(e.path, main="main"):
            if where == DATA and path in data:
                out[e.path] = (("dataset", "main", path), data[path])
            elif where == "main" and path in files:
                out[e.path] = (("model", "main", path), files[path])
            else:
                continue
            break
    return out


def _branch_listings(
    api: HfApi, repo_id: str, branches: tuple[str, ...]
) -> dict[str, dict[str, tuple[int, str | None]]]:
    """{checkpoint branch: {path: (size, LFS sha256)}}, from the tree API (no downloads)."""
    return {
        name: {p: (stat.size, stat.sha256) for p, stat in _hub_files(api, repo_id, name).items()}
        for name in branches
        if name != "main" and HUB_BRANCH.fullmatch(name)
    }


def audit_hub_repo(
    repo_id: str,
    *,
    endpoint: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> AuditReport:
    """Audit a Hub model repo from its file tree, LFS sha256s, branches and small text files.

    Weights are never downloaded: only small non-LFS files (README.md, mof.yaml, MANIFEST.json,
    config.json, LICENSE files, Croissant data cards) are fetched.

    Args:
        repo_id: ``org/name``.
        endpoint: Hub URL; None uses huggingface_hub's default.
        revision: Branch, tag or commit (default ``main``).
        token: Access token, or False for anonymous access.

    Returns:
        The report, with target ``hf:<repo_id>@<revision>``.

    Raises:
        ArtifactError: The repo or revision cannot be read.
    """
    api = HfApi(endpoint=endpoint, token=token)
    target = f"hf:{repo_id}@{revision or 'main'}"
    try:
        with tempfile.TemporaryDirectory(prefix="openrelease-audit-") as tmp:
            probe_endpoint(api, repo_id)
            sha = api.model_info(repo_id, revision=revision).sha or revision
            files = _hub_files(api, repo_id, sha)
            moved: dict[str, Where] = {}

            def readable(path: str) -> bool:
                stat = files[path]
                small = not stat.lfs and stat.size <= MAX_TEXT_BYTES
                return small and _HUB_READABLE.fullmatch(path) is not None

            def read(path: str, max_bytes: int) -> bytes:
                repo_type, rev, in_repo = moved.get(path, ("model", sha or "main", path))
                repo = repo_id if repo_type == "model" else f"{repo_id}-{DATA}"
                local = api.hf_hub_download(
                    repo, in_repo, revision=rev, repo_type=repo_type, local_dir=tmp
                )
                return read_capped(Path(local), max_bytes=max_bytes)

            branches = tuple(b.name for b in api.list_repo_refs(repo_id).branches)
            if BUNDLE_MANIFEST in files and not files[BUNDLE_MANIFEST].lfs:
                published = _published_paths(
                    api, repo_id, files, read(BUNDLE_MANIFEST, MAX_JSON_BYTES)
                )
                moved = {path: where for path, (where, _) in published.items()}
                files.update({path: stat for path, (_, stat) in published.items()})
            rel = ReleaseFiles(target, "hub", read, readable, files=files, branches=branches)
            check_manifest(rel, root=None, check_hashes=False)
            report = _audit(rel, name=repo_id.rsplit("/", 1)[-1])
            report.problems += branch_problems(_branch_listings(api, repo_id, branches))
            return report
    except HUB_ERRORS as exc:
        what, hint = describe_hub_error(exc)
        raise ArtifactError(f"{target} cannot be read ({what}); {hint}.") from None


def audit(
    target: str,
    *,
    endpoint: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    check_hashes: bool = True,
) -> AuditReport:
    """Audit ``target``: a release folder, a MOT YAML file, or a Hub repo id ``org/name``.

    Raises:
        ArtifactError: The target is none of these, or cannot be read.
    """
    path = Path(target)
    if path.is_dir():
        return audit_folder(path, check_hashes=check_hashes)
    if path.is_file():
        return audit_mot_yaml(path)
    if path.exists() or path.is_symlink():
        raise ArtifactError(f"{target[:200]!r} is neither a folder nor a regular file.")
    if _looks_local(target):
        raise ArtifactError(
            f"{target[:200]!r} does not exist (a local path, so it was not looked up on the "
            "Hub); check the path, or pass a Hub repo id as ORG/NAME."
        )
    if _HUB_REPO_ID.fullmatch(target):
        return audit_hub_repo(target, endpoint=endpoint, revision=revision, token=token)
    raise ArtifactError(f"{target[:200]!r} is not a folder, a MOT YAML file or a Hub repo id.")


_HUB_REPO_ID = re.compile(
    r"(?!.*(?:--|\.\.))[A-Za-z0-9_](?:[\w.-]{0,94}[\w])?/[A-Za-z0-9_](?:[\w.-]{0,94}[\w])?"
)
"""ORG/NAME as the Hub allows it: no leading or trailing '.' or '-', no '--' or '..'."""
_LOCAL_SUFFIXES = (".yaml", ".yml", ".json", ".md", ".txt", ".safetensors")


def _looks_local(target: str) -> bool:
    """Whether a missing ``target`` is a mistyped local path rather than a Hub repo id."""
    first = target.split("/", 1)[0]
    return (
        target.startswith((".", "/", "~"))
        or target.count("/") != 1
        or os.sep in target.replace("/", "")
        or (os.altsep is not None and os.altsep != "/" and os.altsep in target)
        or target.lower().endswith(_LOCAL_SUFFIXES)
        or Path(first).is_dir()
    )
