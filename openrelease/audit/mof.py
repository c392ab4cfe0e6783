"""MOF 1.0 as the Model Openness Tool (MOT) implements it: components, licenses, YAML, scoring.

Owns MOT's exact scoring (shared/mof/SCORING.md) and the MOT YAML schema; evidence is audit.py's.
"""

from __future__ import annotations

import datetime
import difflib
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from openrelease.errors import ArtifactError, OpenReleaseError, ParamsError
from openrelease.layout import BundleSection
from openrelease.params import parse_yaml
from openrelease.verify.untrusted import read_capped

MAX_MOT_YAML_BYTES = 1 << 20
"""MOT descriptions are a few kB; anything above 1 MiB is refused unread."""
FRAMEWORK = {"name": "Model Openness Framework", "version": "1.0", "date": "2024-12-15"}
LABELS = {
    0: "Unclassified",
    1: "Class I - Open Science Model",
    2: "Class II - Open Tooling Model",
    3: "Class III - Open Model",
}
UNLICENSED = "unlicensed"
ContentType = Literal["code", "data", "document"]
Status = Literal["included", "invalid", "unlicensed", "missing"]
_TR, _RP = "technical_report", "research_paper"
_RELEASE_ORDER: tuple[str, ...] = ("name", "version", "date", "type", "architecture")
_RELEASE_ORDER += ("treatment", "origin", "producer", "contact", "repository", "huggingface")


@dataclass(frozen=True)
class Component:
    """One of MOT's 17 components."""

    id: str
    name: str
    """The exact MOT name (``release.components[].name``)."""
    content_type: ContentType
    mof_class: int
    """3, 2 or 1: the class that first requires it (or lists it, when optional)."""
    required: bool
    description: str


@dataclass(frozen=True)
class LicenseLists:
    """MOT's license lists (open = OSI or FSF-libre or its open-data list or OpenMDW)."""

    open: frozenset[str]
    known: frozenset[str]
    type_appropriate: Mapping[str, frozenset[str]]


def _load(name: str) -> Any:
    text = resources.files("openrelease.audit.mof_data").joinpath(name).read_text(encoding="utf-8")
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.cache
def mof_components() -> tuple[Component, ...]:
    """The 17 components in MOT's catalogue order (class III, II, I)."""
    return tuple(
        Component(
            id=c["id"],
            name=c["mot_name"],
            content_type=c["content_type"],
            mof_class=c["class"],
            required=c["required"],
            description=c["description"],
        )
        for c in _load("components.yaml")["components"]
    )


@functools.cache
def _by_key() -> dict[str, Component]:
    return {k: c for c in mof_components() for k in (c.id, c.name)}


def component(key: str) -> Component:
    """Look a component up by our id (``model_card``) or its exact MOT name (``Model card``).

    Raises:
        ParamsError: No such component; the message suggests the closest name.
    """
    found = _by_key().get(key)
    if found is None:
        close = difflib.get_close_matches(key, list(_by_key()), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "use one of the 17 MOT names"
        raise ParamsError(f"unknown MOF component {key[:80]!r}; {hint}")
    return found


@functools.cache
def license_lists() -> LicenseLists:
    """MOT's license lists, read from the packaged ``mof_data/licenses.yaml``."""
    raw = _load("licenses.yaml")
    by_type = {k: frozenset(v) for k, v in raw["type_appropriate"].items()}
    open_ids = frozenset(raw["open_effective_union"])
    lists = ("fsf_libre", "osi_approved", "open_data_hardcoded", "open_other_hardcoded")
    known = open_ids.union(*(raw[k] for k in lists), *by_type.values())
    return LicenseLists(open=open_ids, known=known, type_appropriate=by_type)


def is_open_license(license_id: str) -> bool:
    """True when MOT counts ``license_id`` as open (exact, case-sensitive SPDX id)."""
    return license_id in license_lists().open


@functools.cache
def _known_folded() -> dict[str, str]:
    return {k.casefold(): k for k in sorted(license_lists().known)}


def normalize_license(text: str) -> str:
    """Map a case variant of a known SPDX id (the Hub's ``apache-2.0``) to the SPDX spelling."""
    return _known_folded().get(text.strip().casefold(), text.strip())


# --------------------------------------------------------------------------- MOT YAML schema


def _to_text(value: Any) -> Any:
    """YAML turns ``7`` into an int and ``2025-01-01`` into a date; MOT reads both as text."""
    if isinstance(value, bool):
        raise ValueError("expected text, got a boolean")
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, int | float):
        return str(value)
    return value


Text = Annotated[str | None, BeforeValidator(_to_text)]


class _Mot(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class MotLicense(_Mot):
    """A release-wide license: ``release.license.<distribution|code|data|document>``."""

    name: Text = None
    path: Text = None


class MotComponent(_Mot):
    """One entry of ``release.components``."""

    name: str
    description: Text = None
    license: Text = None
    """SPDX id, ``unlicensed``, or None to inherit the release-wide license."""
    license_path: Text = None
    component_path: Text = None

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        if name not in {c.name for c in mof_components()}:
            close = difflib.get_close_matches(name, [c.name for c in mof_components()], n=1)
            hint = f"did you mean {close[0]!r}?" if close else "use one of the 17 MOT names"
            raise ValueError(f"unknown component {name[:80]!r}; {hint}")
        return name


class MotRelease(_Mot):
    """``release``: what is released, by whom, under which licenses."""

    name: Annotated[str, BeforeValidator(_to_text), Field(min_length=1, max_length=500)]
    version: Text = None
    date: Text = None
    type: Text = None
    architecture: Text = None
    treatment: Text = None
    origin: Text = None
    producer: Text = None
    contact: Text = None
    repository: Text = None
    huggingface: Text = None
    license: dict[str, MotLicense | None] | None = None
    components: list[MotComponent] = Field(max_length=17)


class MotFramework(_Mot):
    """``framework``: always MOF 1.0."""

    name: Literal["Model Openness Framework"]
    version: Text = None
    date: Text = None


class MotDocument(_Mot):
    """A whole MOT YAML file."""

    framework: MotFramework
    release: MotRelease


def parse_mot_yaml(text: str, *, source: str) -> MotDocument:
    """Parse and validate MOT YAML text (safe loader, no aliases, no duplicate keys).

    Raises:
        ArtifactError: Too big, bad YAML, or off-schema; one line naming the place and the fix.
    """
    if len(text) > MAX_MOT_YAML_BYTES:
        raise ArtifactError(f"{source} is over 1 MiB; a MOT description is a few kB.", path=source)
    try:
        raw = parse_yaml(text, source=source)
    except ParamsError as exc:
        raise ArtifactError(str(exc), path=source) from None
    except RecursionError:
        raise ArtifactError(f"{source}: YAML nested too deeply to read.", path=source) from None
    if not isinstance(raw, dict):
        raise ArtifactError(
            f"{source}: expected a mapping with framework and release.", path=source
        )
    try:
        return MotDocument.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<root>"
        msg = str(first["msg"]).removeprefix("Value error, ")
        hint = "" if msg.endswith("?") else "; fix it to match the MOT YAML schema."
        raise ArtifactError(f"{source}: {loc}: {msg}{hint}", path=source) from None


def load_mot_yaml(path: Path) -> MotDocument:
    """Read and parse a MOT YAML file (no symlinks, at most 1 MiB, UTF-8).

    Raises:
        ArtifactError: The file is unreadable, too big, not UTF-8, or not valid MOT YAML.
    """
    data = read_capped(path, max_bytes=MAX_MOT_YAML_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ArtifactError(f"{path} is not valid UTF-8.", path=str(path)) from None
    return parse_mot_yaml(text, source=str(path))


# --------------------------------------------------------------------------- scoring


class ComponentScore(BaseModel):
    """How MOT scores one required or optional component."""

    model_config = ConfigDict(frozen=True)

    component: str
    mof_class: int
    required: bool
    status: Status
    license: str | None
    type_appropriate: bool | None


class MofScore(BaseModel):
    """MOT's result: final class, the three cumulative percentages, per-component statuses."""

    model_config = ConfigDict(frozen=True)

    mof_class: int
    """1 (Class I), 2, 3, or 0 when unclassified."""
    label: str
    class_iii: float
    class_ii: float
    class_i: float
    components: tuple[ComponentScore, ...]

    @property
    def missing(self) -> list[str]:
        """Required components that keep the release from a higher class (absent or not open)."""
        return [c.component for c in self.components if c.required and c.status != "included"]


def resolve_licenses(doc: MotDocument) -> dict[str, str]:
    """{component id: license} for every listed component, with MOT's fallbacks.

    A component's own ``license`` wins (``''`` and ``unlicensed`` block inheritance);
    otherwise ``release.license.<content type>.name``, then ``distribution.name``.
    """
    globals_ = doc.release.license or {}

    def global_name(kind: str) -> str | None:
        entry = globals_.get(kind)
        name = entry.name if entry is not None else None
        return name if name not in (None, "", "0") else None

    out: dict[str, str] = {}
    for entry in doc.release.components:  # duplicates: the last entry wins, as in MOT
        comp = component(entry.name)
        if entry.license is not None:
            out[comp.id] = entry.license or UNLICENSED
        else:
            inherited = global_name(comp.content_type) or global_name("distribution")
            out[comp.id] = inherited or UNLICENSED
    return out


def _status(license_id: str | None) -> Status:
    if license_id is None:
        return "missing"
    if is_open_license(license_id):
        return "included"
    return "unlicensed" if license_id == UNLICENSED else "invalid"


def _progress(cls: int, included: Mapping[int, int], *, tr_ok: bool, rp_ok: bool) -> float:
    """MOT's getProgress: a stricter incomplete class makes this one 0."""
    num_required = {
        c: sum(x.required and x.mof_class == c for x in mof_components()) for c in (1, 2, 3)
    }
    total, count = 0, 0
    for i in range(3, cls - 1, -1):
        total += num_required[i]
        count = included[i]
        if count < total:
            if i > cls:
                return 0.0
            break
    if cls == 1 and not tr_ok and rp_ok:
        total -= 1
    return min(count / total * 100, 100.0)


def score_licenses(licenses: Mapping[str, str]) -> MofScore:
    """Score a release from the resolved license of each present component.

    Args:
        licenses: {component id or MOT name: resolved license} for every present component;
            ``unlicensed`` (or ``''``) for a present component with no license.

    Returns:
        MOT's class, percentages and per-component statuses.
    """
    resolved = {component(k).id: v or UNLICENSED for k, v in licenses.items()}
    status = {c.id: _status(resolved.get(c.id)) for c in mof_components()}
    tr_ok, rp_ok = status[_TR] == "included", status[_RP] == "included"
    substitute = not tr_ok and status[_RP] != "missing"
    included: dict[int, int] = {}
    for cls in (3, 2, 1):
        need = [c.id for c in mof_components() if c.required and c.mof_class >= cls]
        included[cls] = sum(status[i] == "included" for i in need)
        if substitute and cls >= 2 and rp_ok:
            included[cls] += 1  # the paper fills the technical report's slot (III and II)
    pct = {c: _progress(c, included, tr_ok=tr_ok, rp_ok=rp_ok) for c in (3, 2, 1)}
    final = 0
    for cls in (3, 2, 1):
        if pct[cls] == 100.0:
            final = cls
    rows = tuple(
        ComponentScore(
            component=c.name,
            mof_class=c.mof_class,
            required=c.required,
            status=status[c.id],
            license=resolved.get(c.id),
            type_appropriate=(
                resolved[c.id] in license_lists().type_appropriate[c.content_type]
                if c.id in resolved
                else None
            ),
        )
        for c in mof_components()
    )
    return MofScore(
        mof_class=final,
        label=LABELS[final],
        class_iii=pct[3],
        class_ii=pct[2],
        class_i=pct[1],
        components=rows,
    )


def score_release(doc: MotDocument) -> MofScore:
    """Score a MOT YAML document exactly as MOT does."""
    return score_licenses(resolve_licenses(doc))


# --------------------------------------------------------------------------- writing


def mof_release_yaml(
    *,
    name: str,
    version: str,
    producer: str,
    components: Mapping[str, str | None],
    licenses: Mapping[str, str] | None = None,
    paths: Mapping[str, str] | None = None,
    license_paths: Mapping[str, str] | None = None,
    release_fields: Mapping[str, str] | None = None,
) -> str:
    """Render a MOT YAML release description (validated by parsing it back).

    Args:
        name: ``release.name`` (MOT's unique key).
        version: ``release.version`` (e.g. ``1M`` or ``7B``).
        producer: Organisation releasing the model.
        components: {component id or MOT name: SPDX id, or None to inherit} for every
            component released; components left out are absent.
        licenses: Release-wide licenses by kind (distribution, code, data, document).
        paths: {component id or MOT name: ``component_path``} (bundle-relative path or URL).
        license_paths: {SPDX id: path of its text}, e.g. ``LICENSES/Apache-2.0.txt``.
        release_fields: Other ``release`` keys: date (``YYYY-MM-DD``; none by default, so
            bundles stay reproducible), type, architecture, treatment, origin, contact,
            repository, huggingface.

    Returns:
        The YAML text, ending with a newline.

    Raises:
        ParamsError: An unknown component, license kind or release field.
    """
    lic_paths = dict(license_paths or {})
    kinds = {"distribution", "code", "data", "document"}
    if bad := set(licenses or {}) - kinds:
        raise ParamsError(f"unknown license kind {sorted(bad)[0]!r}; use one of {sorted(kinds)}")
    fields = {"type": "language", "architecture": "transformer decoder", "origin": ""}
    fields |= {"contact": ""} | dict(release_fields or {})
    if bad := set(fields) - set(_RELEASE_ORDER):
        raise ParamsError(f"unknown release field {sorted(bad)[0]!r}; use {_RELEASE_ORDER}")
    wanted = {component(k).id: v for k, v in components.items()}
    where = {component(k).id: v for k, v in (paths or {}).items()}
    entries: list[dict[str, str]] = []
    for comp in mof_components():
        if comp.id not in wanted:
            continue
        entry = {"name": comp.name, "description": comp.description}
        if (lic := wanted[comp.id]) is not None:
            entry["license"] = lic
            if lic in lic_paths:
                entry["license_path"] = lic_paths[lic]
        if comp.id in where:
            entry["component_path"] = where[comp.id]
        entries.append(entry)
    fields |= {"name": name, "version": version, "producer": producer}
    release: dict[str, Any] = {k: fields[k] for k in _RELEASE_ORDER if k in fields}
    release["license"] = {
        kind: {"name": lic, "path": lic_paths.get(lic, "")}
        for kind, lic in (licenses or {}).items()
    }
    release["components"] = entries
    text = yaml.safe_dump(
        {"framework": FRAMEWORK, "release": release}, sort_keys=False, allow_unicode=True
    )
    try:
        parse_mot_yaml(text, source="mof.yaml")
    except OpenReleaseError as exc:
        raise ParamsError(f"the MOT description would be invalid: {exc}") from None
    return text


def _code(module: str, *, package: bool = False) -> str:
    """Where a module (or a package's folder) of ours sits in a bundle's ``code/``."""
    return f"{BundleSection.CODE}/" + module.replace(".", "/") + ("" if package else ".py")


# MOT component name -> (content type, bundle path): the evidence each component points at in
# a bundle we build. Code paths come from module names (tests/test_mof.py checks each exists).
# The research paper's path is docs/research_paper<suffix> when params name a paper file.
COMPONENTS: dict[str, tuple[str, str]] = {
    "Model architecture": ("code", _code("openrelease.train.model")),
    "Data preprocessing code": ("code", _code("openrelease.data", package=True)),
    "Training code": ("code", _code("openrelease.train", package=True)),
    "Inference code": ("code", _code("openrelease.eval.stage")),
    "Evaluation code": ("code", _code("openrelease.eval.stage")),
    "Supporting libraries and tools": ("code", f"{BundleSection.SBOM}/bom.cdx.json"),
    "Model parameters (Final)": ("data", BundleSection.MODEL),
    "Model parameters (Intermediate)": ("data", BundleSection.CHECKPOINTS),
    "Datasets": ("data", BundleSection.DATA),
    "Evaluation data": ("data", f"{BundleSection.DATA}/eval_problems.jsonl"),
    "Model metadata": ("data", BundleSection.CONFIGS),
    "Sample model outputs": ("document", f"{BundleSection.EVALS}/samples"),
    "Model card": ("document", "README.md"),
    "Data card": ("document", f"{BundleSection.DATA}/croissant.json"),
    "Technical report": ("document", f"{BundleSection.DOCS}/technical_report.md"),
    "Research paper": ("document", f"{BundleSection.DOCS}/research_paper.md"),
    "Evaluation results": ("document", f"{BundleSection.EVALS}/results"),
}
