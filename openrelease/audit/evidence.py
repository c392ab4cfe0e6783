"""Find and check the evidence for each MOF component in a release's file listing.

Works on a listing plus a reader, so folders and Hub repos get the same checks; never writes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from openrelease.audit.mof import UNLICENSED, MotDocument, mof_components, normalize_license
from openrelease.errors import ArtifactError, OpenReleaseError
from openrelease.layout import (
    BUNDLE_CHECKPOINT_DIR,
    BUNDLE_CHECKPOINT_FILE,
    BUNDLE_MANIFEST,
    CHECKPOINT_META,
)
from openrelease.manifest import BundleManifest, CheckpointMeta, validate_model
from openrelease.params import parse_yaml
from openrelease.verify.bundle import Problem
from openrelease.verify.safetensors_header import read_safetensors_header
from openrelease.verify.untrusted import (
    hash_files,
    parse_json_bytes,
    printable_name,
    unsafe_path_reason,
)

MAX_TEXT_BYTES = 1 << 20
MAX_JSON_BYTES = 16 << 20
MAX_MANIFEST_BYTES = 64 << 20
MAX_FILES = 500_000
MAX_CHECKED = 256
"""Evidence files parsed per component; the rest are only listed."""
_CODE = r"\.(py|sh|ipynb|c|cc|cpp|cu|rs|go|jl|js|ts)$"
_WEIGHTS = r"\.(safetensors|bin|pt|pth|ckpt|gguf)$"
_DATA = r"\.(jsonl?|parquet|arrow|npy|npz|txt|csv|gz|zst|tar)$"
_DOCS = r"\.(md|pdf|txt|tex|html|rst|json|jsonl|csv|ya?ml)$"
_STEP = r"(checkpoint|step|global_step|iter)[-_]?\d+"
RULES: dict[str, tuple[str, ...]] = {
    "model_architecture": (
        r"(^|/)(model|models|modeling[^/]*|architecture)(\.py|/[^/]+\.py)$",
        r"^(model/)?config\.json$",
    ),
    "model_parameters_final": (r"^(model/)?[^/]+" + _WEIGHTS,),
    "evaluation_results": (
        r"^evals?/(?!(.*/)?samples?)(.*/)?[^/]+\.(json|csv|md|ya?ml)$",
        r"^eval(uation)?_?results?[^/]*\.(json|csv|md)$",
    ),
    "model_card": (r"^readme\.md$",),
    "data_card": (
        r"(^|/)croissant[^/]*\.json$",
        r"^(data/(readme|data_?card)|(data|dataset)_?card)[^/]*\.md$",
    ),
    "technical_report": (
        r"^docs?/(.*/)?[^/]*report[^/]*\.(md|pdf|tex|html)$",
        r"^(technical_)?report[^/]*\.(md|pdf)$",
    ),
    "sample_model_outputs": (r"(^|/)(samples?|sample_outputs|generations)(/.*)?[^/]*" + _DOCS,),
    "training_code": (r"(^|/)(train|trainer|training|pretrain|finetune|sft)[^/]*(/.*)?" + _CODE,),
    "inference_code": (r"(^|/)(infer|generat|predict|serv|chat|sampl)[^/]*(/.*)?" + _CODE,),
    "evaluation_code": (r"(^|/)(eval|bench|harness)[^/]*(/.*)?" + _CODE,),
    "evaluation_data": (r"^data/(.*/)?[^/]*(eval|test|bench)[^/]*" + _DATA, r"^evals?/data/.+"),
    "supporting_libraries_and_tools": (
        r"^sbom/[^/]+\.(json|xml|spdx)$",
        r"(^|/)(requirements[^/]*\.txt|pyproject\.toml|environment\.ya?ml|uv\.lock)$",
    ),
    "datasets": (r"^data/(?!(.*/)?(croissant|readme|data_?card))(.*/)?[^/]+" + _DATA,),
    "data_preprocessing_code": (
        r"(^|/)(data|preprocess|prepare|tokeniz|clean|dedup|filter)[^/]*(/.*)?" + _CODE,
    ),
    "model_parameters_intermediate": (
        "^" + BUNDLE_CHECKPOINT_DIR + r"/[^/]+" + _WEIGHTS,
        r"(^|/)" + _STEP + r"/(.*/)?[^/]+" + _WEIGHTS,
    ),
    "research_paper": (
        r"^docs?/(.*/)?[^/]*(paper|arxiv|preprint)[^/]*\.(md|pdf|tex|html)$",
        r"^(research_)?paper[^/]*\.(md|pdf)$",
    ),
    "model_metadata": (
        r"^configs?/.+\.(ya?ml|json|lock)$",
        "^" + BUNDLE_CHECKPOINT_DIR + "/" + re.escape(CHECKPOINT_META) + "$",
        r"^(model/)?(generation_config|training_args|hparams|hyperparameters)[^/]*\.(json|ya?ml)$",
    ),
}
"""Where each component is usually found (lower-cased bundle-relative paths)."""
_COMPILED = {cid: [re.compile(r) for r in rules] for cid, rules in RULES.items()}
_KIND = {"code": _CODE, "document": _DOCS, "data": ""}
_WEIGHT_IDS = ("model_parameters_final", "model_parameters_intermediate")
_BRANCH = re.compile(
    r"(?:[a-z0-9_]+-)?(?:step|checkpoint|ckpt)-?\d+(?:-tokens[0-9.]+[kmbt]?b?)?", re.IGNORECASE
)
_ROOT_LICENSE = re.compile(r"(licen[cs]e|copying)[^/]*", re.IGNORECASE)
_META = re.compile(BUNDLE_CHECKPOINT_DIR + "/" + re.escape(CHECKPOINT_META))
_SIGNATURES = (  # (SPDX id, phrases that must all appear), most specific first
    ("BSL-1.0", ("boost software license",)),
    ("AGPL-3.0-only", ("gnu affero general public",)),
    ("LGPL-3.0-only", ("gnu lesser general public", "version 3")),
    ("GPL-3.0-only", ("gnu general public license", "version 3")),
    ("GPL-2.0-only", ("gnu general public license", "version 2")),
    ("Apache-2.0", ("apache license", "version 2.0")),
    ("MPL-2.0", ("mozilla public license",)),
    ("MIT", ("permission is hereby granted, free of charge",)),
    ("BSD-3-Clause", ("redistribution and use in source and binary forms", "neither the name")),
    ("BSD-2-Clause", ("redistribution and use in source and binary forms",)),
    ("CC-BY-SA-4.0", ("attribution-sharealike 4.0 international",)),
    ("CC-BY-4.0", ("attribution 4.0 international",)),
    ("CC0-1.0", ("cc0 1.0 universal",)),
    ("CDLA-Permissive-2.0", ("community data license agreement", "permissive", "2.0")),
    ("CDLA-Permissive-1.0", ("community data license agreement", "permissive")),
    ("CDLA-Sharing-1.0", ("community data license agreement", "sharing")),
    ("ODbL-1.0", ("open database license",)),
    ("PDDL-1.0", ("public domain dedication and license",)),
    ("Unlicense", ("unlicense.org",)),
)


class LicenseStatement(BaseModel):
    """One place a release states a license."""

    source: str
    """Where: ``mof.yaml``, ``README.md``, ``LICENSES/MIT.txt``, ``data/croissant.json``."""
    scope: str
    """What it covers: a license kind, a component name, ``release``, ``data`` or ``text``."""
    license: str


@dataclass(frozen=True)
class FileStat:
    """Size of a listed file, and its sha256 when the listing gives one (Hub LFS)."""

    size: int
    sha256: str | None = None
    lfs: bool = False


@dataclass
class ReleaseFiles:
    """A release's listing plus ways to read it; folders and Hub repos look alike here."""

    target: str
    kind: Literal["folder", "hub"]
    read: Callable[[str, int], bytes]
    """``read(path, max_bytes)``: bytes of a small file; raises ArtifactError."""
    readable: Callable[[str], bool]
    """Whether ``read`` may fetch this file (the Hub reader refuses weights)."""
    files: dict[str, FileStat] = field(default_factory=dict)
    branches: tuple[str, ...] = ()
    problems: list[Problem] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)
    """Files that disagree with MANIFEST.json, and how."""
    checked: dict[str, str | None] = field(default_factory=dict)

    def add(self, code: str, path: str | None, message: str, *, error: bool = True) -> None:
        """Record a problem (an error, or a warning when ``error`` is False)."""
        severity: Literal["error", "warning"] = "error" if error else "warning"
        self.problems.append(Problem(code=code, path=path, message=message, severity=severity))

    def text(self, path: str, *, max_bytes: int = MAX_TEXT_BYTES) -> str | None:
        """UTF-8 text of a small file, or None when absent or not readable here."""
        if path not in self.files or not self.readable(path):
            return None
        return self.read(path, max_bytes).decode("utf-8", errors="replace")

    def json(self, path: str, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
        """Parsed JSON of a listed file; raises ArtifactError when it is not JSON."""
        return parse_json_bytes(self.read(path, max_bytes), where=path)


def walk_folder(folder: Path, rel: ReleaseFiles) -> None:
    """List regular files under ``folder`` into ``rel``; symlinks are reported, not followed."""
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        links = [d for d in dirnames if (base / d).is_symlink()]
        dirnames[:] = sorted(d for d in dirnames if d != ".git" and d not in links)
        for name in filenames + links:
            path = printable_name((base / name).relative_to(folder).as_posix())
            if (base / name).is_symlink() or not (base / name).is_file():
                rel.add("symlink", path, "is a symlink or special file; it was not read.")
                continue
            rel.files[path] = FileStat((base / name).lstat().st_size)
        if len(rel.files) > MAX_FILES:
            raise ArtifactError(f"{folder} holds over {MAX_FILES} files; is it a release?")


def check_manifest(rel: ReleaseFiles, *, root: Path | None, check_hashes: bool) -> None:
    """Compare MANIFEST.json with the listing: sizes, Hub LFS sha256s, local sha256s."""
    if BUNDLE_MANIFEST not in rel.files:
        return
    try:
        raw = rel.json(BUNDLE_MANIFEST, max_bytes=MAX_MANIFEST_BYTES)
        manifest = validate_model(raw, BundleManifest, where=BUNDLE_MANIFEST)
    except ArtifactError as exc:
        rel.add("manifest", BUNDLE_MANIFEST, str(exc))
        return
    sizes: dict[str, int] = {}
    for e in manifest.files:
        stat = rel.files.get(e.path)
        if reason := unsafe_path_reason(e.path):
            rel.add("unsafe_path", printable_name(e.path)[:200], f"MANIFEST.json path {reason}.")
        elif stat is None:
            rel.bad[e.path] = "is missing" if root is not None else ""
        elif stat.size != e.size or stat.sha256 not in (None, e.sha256):
            rel.bad[e.path] = f"is {stat.size} bytes ({stat.sha256 or 'no sha256'})"
        else:
            sizes[e.path] = e.size
    if root is not None and check_hashes:
        digests, errors = hash_files(root, sizes)
        rel.bad |= {p: f"cannot be read ({why})" for p, why in errors.items()}
        recorded = {e.path: e.sha256 for e in manifest.files}
        rel.bad |= {p: f"has {d[:19]}..." for p, d in digests.items() if d != recorded[p]}
    for path, why in sorted(rel.bad.items()):
        if why:  # checkpoints live on branches on the Hub: absence on main is verify_hub's job
            rel.add("manifest_mismatch", path, f"{why}; MANIFEST.json records otherwise.")


def check_file(rel: ReleaseFiles, path: str) -> str | None:
    """Why the evidence file at ``path`` is unsound, or None: parses headers and small files."""
    if path not in rel.checked:
        rel.checked[path] = _check_file(rel, path)
    return rel.checked[path]


def _check_file(rel: ReleaseFiles, path: str) -> str | None:
    low = path.lower()
    if rel.bad.get(path):
        return f"{rel.bad[path]}, not what MANIFEST.json records"
    if rel.files[path].size == 0:
        return "is empty"
    try:
        if low.endswith(".safetensors") and rel.kind == "folder":
            read_safetensors_header(Path(rel.target) / path)
        elif low.endswith(".json") and rel.readable(path):
            raw = rel.json(path)
            if _META.fullmatch(path):
                validate_model(raw, CheckpointMeta, where=path)
        elif low.endswith((".yaml", ".yml")) and rel.readable(path):
            parse_yaml(rel.read(path, MAX_JSON_BYTES).decode("utf-8", "replace"), source=path)
    except OpenReleaseError as exc:
        return str(exc)
    return None


def read_card(rel: ReleaseFiles) -> dict[str, Any]:
    """The model card's YAML front matter ({} when absent); a broken one marks README.md."""
    try:
        text = rel.text("README.md") or ""
    except ArtifactError as exc:  # oversized or unreadable: the card is broken, not the audit
        rel.checked["README.md"] = str(exc)
        return {}
    match = re.match(r"---\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.DOTALL)
    if match is None:
        return {}
    try:
        meta = parse_yaml(match.group(1), source="README.md front matter")
    except OpenReleaseError as exc:
        rel.checked["README.md"] = str(exc)
        return {}
    return meta if isinstance(meta, dict) else {}


def as_strings(value: Any) -> list[str]:
    """A YAML scalar or list as a list of non-empty strings (other types dropped)."""
    values = value if isinstance(value, list) else [value]
    return [str(v) for v in values if isinstance(v, str | int | float) and str(v)]


def detect_license(text: str) -> str | None:
    """The SPDX id of a well-known license text, or None."""
    low = " ".join(text[:20_000].lower().split())
    return next((lid for lid, need in _SIGNATURES if all(n in low for n in need)), None)


def license_statements(
    rel: ReleaseFiles, doc: MotDocument | None, card: dict[str, Any]
) -> list[LicenseStatement]:
    """Every license the release states: mof.yaml, card, LICENSE files, data cards."""
    out: list[LicenseStatement] = []
    if doc is not None:
        for kind, lic in (doc.release.license or {}).items():
            if lic is not None and lic.name:
                out.append(LicenseStatement(source="mof.yaml", scope=kind, license=lic.name))
        for c in doc.release.components:
            if c.license:
                out.append(LicenseStatement(source="mof.yaml", scope=c.name, license=c.license))
    key = "license_name" if card.get("license") == "other" else "license"
    for value in as_strings(card.get(key)):
        out.append(LicenseStatement(source="README.md", scope="release", license=value))
    for path in sorted(rel.files):
        name = path.rsplit("/", 1)[-1]
        if path.startswith("LICENSES/"):
            stem = re.sub(r"\.(txt|md)$", "", name)
            out.append(LicenseStatement(source=path, scope="text", license=stem))
        elif "/" not in path and _ROOT_LICENSE.fullmatch(name) and (text := rel.text(path)):
            if found := detect_license(text):
                out.append(LicenseStatement(source=path, scope="text", license=found))
        elif re.search(r"(^|/)croissant[^/]*\.json$", path.lower()):
            out += _croissant_licenses(rel, path)
    return [s.model_copy(update={"license": normalize_license(s.license)}) for s in out]


def _croissant_licenses(rel: ReleaseFiles, path: str) -> list[LicenseStatement]:
    if not rel.readable(path) or check_file(rel, path):
        return []
    raw = rel.json(path)
    values = as_strings(raw.get("license")) if isinstance(raw, dict) else []
    # Croissant often gives a URL such as https://spdx.org/licenses/CC-BY-4.0.html
    ids = [re.sub(r"^.*/|\.html?$", "", v.rstrip("/")) for v in values]
    return [LicenseStatement(source=path, scope="data", license=lic) for lic in ids if lic]


# --------------------------------------------------------------------------- per component


def _claimed_files(rel: ReleaseFiles, cid: str, path: str) -> tuple[list[str], str | None]:
    """Files under a claimed ``component_path`` that fit the component, or why none do."""
    path = path.strip().rstrip("/")
    if not path or "://" in path:
        return [], None
    if reason := unsafe_path_reason(path):
        return [], f"component_path {path[:120]!r} {reason}"
    ctype = next(c.content_type for c in mof_components() if c.id == cid)
    kind = re.compile(_WEIGHTS if cid in _WEIGHT_IDS else _KIND[ctype])
    under = [p for p in rel.files if p == path or p.startswith(path + "/")]
    hits = [
        p
        for p in under
        if kind.search(p.lower()) or any(r.search(p.lower()) for r in _COMPILED[cid])
    ]
    if not hits:
        how = "holds no file of this kind" if under else "is not in the release"
        return [], f"component_path {path[:120]!r} {how}"
    return sorted(hits), None


def _virtual(rel: ReleaseFiles, cid: str, card: dict[str, Any]) -> list[str]:
    """Evidence that is not a file: checkpoint branches, model-index results, paper links."""
    if cid == "model_parameters_intermediate":
        return [f"branch:{b}" for b in rel.branches if _BRANCH.fullmatch(b)]
    if cid == "evaluation_results":
        index = card.get("model-index")
        if isinstance(index, list) and any(isinstance(m, dict) and m.get("results") for m in index):
            return ["README.md#model-index"]
    if cid == "research_paper":
        return [t for t in as_strings(card.get("tags")) if t.startswith("arxiv:")]
    return []


@dataclass
class Evidence:
    """What was found for one component and what is wrong with it."""

    paths: list[str]
    broken: list[str]
    """Problems with the evidence itself (unparsable, empty, digest mismatch): not verified."""
    notes: list[str]
    """Problems with the claim's paths (missing, path tricks); other evidence may still hold."""


def find_evidence(
    rel: ReleaseFiles, cid: str, *, claimed_path: str | None, card: dict[str, Any]
) -> Evidence:
    """Find and check the evidence for component ``cid`` (claimed path first, then RULES)."""
    hits, why = _claimed_files(rel, cid, claimed_path) if claimed_path else ([], None)
    seen = set(hits)
    hits += sorted(
        p for p in rel.files if p not in seen and any(r.search(p.lower()) for r in _COMPILED[cid])
    )
    broken: list[str] = []
    for path in hits[:MAX_CHECKED]:
        if (bad := check_file(rel, path)) and len(broken) < 3:
            broken.append(bad if bad.startswith(path) else f"{path} {bad}")
    if cid == "model_parameters_intermediate":
        folders = sorted({p.rsplit("/", 1)[0] for p in hits if BUNDLE_CHECKPOINT_FILE.match(p)})
        broken += [
            f"{f} has no {CHECKPOINT_META}"
            for f in folders
            if f"{f}/{CHECKPOINT_META}" not in rel.files
        ]
    virtual = _virtual(rel, cid, card)
    if virtual and rel.kind == "hub" and cid == "model_parameters_intermediate":
        why = None  # published checkpoints live on branches, not under checkpoints/ on main
    return Evidence(hits + virtual, broken[:3], [why] if why else [])


def fallback_license(doc: MotDocument | None, ctype: str, stmts: list[LicenseStatement]) -> str:
    """A component's license when mof.yaml does not list it: MOT's globals, then card, files."""
    if doc is not None:
        for kind in (ctype, "distribution"):
            entry = (doc.release.license or {}).get(kind)
            if entry is not None and entry.name not in (None, "", "0"):
                return entry.name
    found = [s.license for s in stmts if s.source == "README.md"]
    if ctype == "data":
        found = [s.license for s in stmts if s.scope == "data"] + found
    found += [s.license for s in stmts if s.scope == "text" and "/" not in s.source]
    return found[0] if found else UNLICENSED


def has_license_text(lic: str, stmts: list[LicenseStatement]) -> bool:
    """True when LICENSES/<id> or a root LICENSE file holds the text of ``lic``."""
    return any(s.license == lic and s.scope == "text" for s in stmts)


def check_consistency(
    rel: ReleaseFiles, licenses: dict[str, str], stmts: list[LicenseStatement]
) -> None:
    """Report (as warnings) disagreement between mof.yaml, card, LICENSE files, data card."""
    declared = set(licenses.values()) | {s.license for s in stmts if s.source == "mof.yaml"}
    weights = licenses.get("model_parameters_final")
    for s in stmts:
        if s.source == "README.md" and weights and s.license != weights:
            why = f"states {s.license} but the weights' license is {weights}"
        elif s.scope == "data" and s.license != licenses["datasets"]:
            why = f"states {s.license} but the Datasets license is {licenses['datasets']}"
        elif s.scope == "text" and s.license not in declared:
            why = f"holds the text of {s.license}, which no metadata declares"
        else:
            continue
        rel.add("license_mismatch", s.source, f"{why}; state one license everywhere.", error=False)
    for s in stmts:
        if s.source.startswith("LICENSES/") and (text := rel.text(s.source)):
            found = detect_license(text)
            if found is not None and found != s.license:
                rel.add("license_mismatch", s.source, f"holds the text of {found}.", error=False)
