"""The software behind a release: its exact source (code/) and a CycloneDX 1.6 ML-BOM.

The BOM lists the model, its datasets and every library it ran with. It is plain JSON built here
(no CycloneDX library at run time); tests validate it against the CycloneDX schema.
"""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import openrelease
from openrelease.digest import bare_hex, sha256_json
from openrelease.errors import ProvenanceError
from openrelease.manifest import StageRecord
from openrelease.record.journal import journal_dir
from openrelease.record.runinfo import pip_freeze

SPEC_VERSION = "1.6"
_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([^\s;]+)|@\s*(\S+))")


@dataclass(frozen=True)
class BomModel:
    """The released model as the BOM describes it."""

    name: str
    version: str
    organization: str
    license_id: str
    weights_sha256: str
    """``sha256:<hex>`` of the final weights file."""
    architecture: str
    """The transformers class, e.g. ``LlamaForCausalLM``."""
    family: str
    """e.g. ``llama``."""
    metrics: Mapping[str, float]
    """Eval metrics of the final checkpoint."""
    properties: Mapping[str, str]
    """Extra ``openrelease:*`` facts (checkpoint digest, stages, ...)."""


@dataclass(frozen=True)
class BomDataset:
    """One dataset the model was trained or evaluated on."""

    name: str
    description: str
    license_id: str
    url: str
    digest: str


@dataclass(frozen=True)
class Requirement:
    """One installed distribution: ``name==version`` or ``name @ url``."""

    name: str
    version: str | None
    url: str | None


def parse_requirements(text: str) -> list[Requirement]:
    """Parse pip-freeze text (``name==version``, ``name @ url``); other lines are skipped."""
    out: dict[str, Requirement] = {}
    for line in text.splitlines():
        match = _REQUIREMENT.match(line.strip())
        if match is not None:
            req = Requirement(match.group(1), match.group(2), match.group(3))
            out[_purl(req)] = req
    return sorted(out.values(), key=lambda r: (r.name.lower(), r.version or ""))


def _purl(req: Requirement) -> str:
    name = re.sub(r"[-_.]+", "-", req.name).lower()
    return f"pkg:pypi/{name}@{req.version}" if req.version else f"pkg:pypi/{name}"


def _spdx_ids() -> frozenset[str]:
    """SPDX ids whose texts ship with openrelease (written as ``id``; others as ``name``)."""
    texts = resources.files("openrelease.release").joinpath("license_texts").iterdir()
    return frozenset(p.name.removesuffix(".txt") for p in texts if p.name.endswith(".txt"))


def _license(license_id: str, spdx_ids: frozenset[str]) -> list[dict[str, Any]]:
    key = "id" if license_id in spdx_ids else "name"
    return [{"license": {key: license_id}}]


def _library(req: Requirement) -> dict[str, Any]:
    lib: dict[str, Any] = {
        "type": "library",
        "bom-ref": _purl(req),
        "name": req.name,
        "purl": _purl(req),
    }
    if req.version:
        lib["version"] = req.version
    if req.url:
        lib["externalReferences"] = [{"type": "distribution", "url": req.url}]
    return lib


def _dataset(ds: BomDataset, spdx_ids: frozenset[str]) -> dict[str, Any]:
    return {
        "type": "data",
        "bom-ref": f"dataset:{ds.name}",
        "name": ds.name,
        "licenses": _license(ds.license_id, spdx_ids),
        "externalReferences": [{"type": "distribution", "url": ds.url}],
        "properties": [{"name": "openrelease:data_digest", "value": ds.digest}],
        "data": [
            {
                "type": "dataset",
                "name": ds.name,
                "description": ds.description,
                "contents": {"url": ds.url},
            }
        ],
    }


def _model(m: BomModel, datasets: Sequence[BomDataset], spdx_ids: frozenset[str]) -> dict[str, Any]:
    return {
        "type": "machine-learning-model",
        "bom-ref": f"model:{m.name}",
        "name": m.name,
        "version": m.version,
        "supplier": {"name": m.organization},
        "licenses": _license(m.license_id, spdx_ids),
        "hashes": [{"alg": "SHA-256", "content": bare_hex(m.weights_sha256)}],
        "modelCard": {
            "modelParameters": {
                "approach": {"type": "self-supervised"},
                "task": "text-generation",
                "architectureFamily": m.family,
                "modelArchitecture": m.architecture,
                "datasets": [{"ref": f"dataset:{d.name}"} for d in datasets],
                "inputs": [{"format": "text"}],
                "outputs": [{"format": "text"}],
            },
            "quantitativeAnalysis": {
                "performanceMetrics": [
                    {"type": k, "value": f"{v:.6g}", "slice": "held-out eval"}
                    for k, v in sorted(m.metrics.items())
                ]
            },
            "considerations": {
                "useCases": ["Research on training dynamics and reproducibility."],
                "technicalLimitations": ["Small model trained on a narrow corpus."],
            },
        },
        "properties": [{"name": k, "value": v} for k, v in sorted(m.properties.items())],
    }


def ml_bom(
    *,
    model: BomModel,
    datasets: Sequence[BomDataset],
    requirements: str,
    created: str,
    tool_version: str,
) -> dict[str, Any]:
    """A CycloneDX 1.6 ML-BOM: the model (with its model card), its datasets, its libraries.

    Args:
        model: The released model.
        datasets: Datasets it was trained and evaluated on.
        requirements: pip-freeze text of the training environment.
        created: UTC ISO-8601 timestamp (from the record, so rebuilds give the same BOM).
        tool_version: openrelease's version.

    Returns:
        The BOM as a dict; identical inputs give an identical BOM (serial number included).
    """
    spdx_ids = _spdx_ids()
    libraries = [_library(r) for r in parse_requirements(requirements)]
    components = [_model(model, datasets, spdx_ids), *(_dataset(d, spdx_ids) for d in datasets)]
    components += libraries
    serial = uuid.uuid5(uuid.NAMESPACE_URL, sha256_json(components) + created)
    return {
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": f"urn:uuid:{serial}",
        "version": 1,
        "metadata": {
            "timestamp": created,
            "tools": {
                "components": [
                    {"type": "application", "name": "openrelease", "version": tool_version}
                ]
            },
            "component": {
                "type": "machine-learning-model",
                "bom-ref": f"release:{model.name}",
                "name": model.name,
                "version": model.version,
            },
        },
        "components": components,
        "dependencies": [
            {
                "ref": f"model:{model.name}",
                "dependsOn": [f"dataset:{d.name}" for d in datasets]
                + [lib["bom-ref"] for lib in libraries],
            }
        ],
    }


# --------------------------------------------------------------------------- source


@dataclass
class SourceTree:
    """What code/ holds: file contents (from git) or files (the installed package), and more."""

    files: dict[str, bytes | Path] = field(default_factory=dict)
    """Path under code/ -> bytes, or the file to copy."""
    source: dict[str, Any] = field(default_factory=dict)
    """SOURCE.json: where the code comes from (commit, dirty, per-stage commits)."""
    requirements: str = ""
    """The recorded pip freeze (code/requirements.txt)."""
    warnings: list[str] = field(default_factory=list)


def _git(cwd: Path, *args: str) -> bytes | None:
    try:
        proc = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, check=False, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


DVC_DIR = ".dvc"
DVC_IGNORE = ".dvcignore"


def _git_archive(project_dir: Path, commit: str | None) -> tuple[str, dict[str, bytes]] | None:
    """(commit, {path: bytes}) of the repository holding ``project_dir``; None outside git."""
    top = _git(project_dir, "rev-parse", "--show-toplevel")
    head = _git(project_dir, "rev-parse", "HEAD")
    if top is None or head is None:
        return None
    commit = commit or head.decode().strip()
    root = Path(top.decode().strip())
    archive = _git(root, "archive", "--format=tar", commit)
    if archive is None:
        raise ProvenanceError(
            f"the recorded commit {commit} is not in the git repository at {root}; "
            "fetch or check it out, then rebuild the bundle."
        )
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            # DVC's own files are configuration, not code; DVC takes a folder holding `.dvc/`
            # for a nested repository and refuses a `.dvcignore` inside an output.
            if DVC_DIR in parts[:-1] or parts[-1] == DVC_IGNORE:
                continue
            if member.isfile() and ".." not in parts and not member.name.startswith("/"):
                extracted = tar.extractfile(member)
                assert extracted is not None, "a regular tar member has contents"
                files[member.name] = extracted.read()
    return commit, files


def _package_files() -> dict[str, Path]:
    """The installed openrelease package source, plus its project files in an editable install."""
    package = Path(openrelease.__file__).parent
    files = {
        f"openrelease/{p.relative_to(package).as_posix()}": p
        for p in sorted(package.rglob("*"))
        if p.is_file()
        and "__pycache__" not in p.parts
        and not p.name.startswith(".")
        and p.suffix != ".pyc"
    }
    pyproject = package.parent / "pyproject.toml"
    if pyproject.is_file() and 'name = "openrelease"' in pyproject.read_text(encoding="utf-8"):
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (package.parent / name).is_file():
                files[name] = package.parent / name
    return files


def release_source(project_dir: Path, records: Mapping[str, StageRecord]) -> SourceTree:
    """The source the record names, for code/.

    A git archive of the recorded commit (or HEAD), with the recorded diff when the tree was
    dirty; outside git, the installed openrelease package (with pyproject.toml when editable).

    Raises:
        ProvenanceError: The recorded commit is not in the project's git repository.
    """
    tree = SourceTree()
    commits = {s: r.git.commit for s, r in records.items() if r.git.commit}
    newest_first = list(records.values())[::-1]
    last = next((r for r in newest_first if r.git.commit), None)
    archived = _git_archive(project_dir, last.git.commit if last else None)
    tree.source = {"stages": commits, "openrelease_version": openrelease.__version__}
    if archived is not None:
        commit, files = archived
        tree.source |= {"kind": "git-archive", "commit": commit}
        tree.files.update(files)
        if len(set(commits.values())) > 1:
            tree.warnings.append(f"stages ran at different commits {commits}; code/ holds {commit}")
    else:
        tree.source |= {"kind": "installed-package", "commit": None}
    if "openrelease/__init__.py" not in tree.files:
        # The repository only drives openrelease (params, dvc.yaml): ship the package it ran.
        for rel, path in _package_files().items():
            tree.files.setdefault(rel, path)  # the repository's own files win
        tree.source["package"] = "installed"
    if last is not None and last.git.dirty:
        diff = journal_dir(project_dir, last.run_key) / "git.diff"
        if diff.is_file():
            tree.files["git.diff"] = diff
        tree.source |= {"dirty": True, "diff_sha256": last.git.diff_sha256}
    for record in newest_first:
        freeze = journal_dir(project_dir, record.run_key) / "pip-freeze.txt"
        if freeze.is_file():
            tree.requirements = freeze.read_text(encoding="utf-8")
            break
    else:
        tree.warnings.append("no recorded pip freeze; requirements.txt lists this environment")
        tree.requirements = pip_freeze()
    return tree
