"""Check a release bundle against its MANIFEST.json and its own records -> VerifyReport.

Reads only; never writes, never loads tensors or pickles, never imports torch.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, computed_field

from openrelease.digest import sha256_tree
from openrelease.errors import ArtifactError, ParamsError
from openrelease.layout import (
    BUNDLE_MANIFEST,
    CHECKPOINT_META,
    PORTABLE_STATE_FILES,
    STEP_DIR,
    Bundle,
    BundleSection,
)
from openrelease.manifest import BundleManifest, CheckpointMeta, TokenizerProbe
from openrelease.params import parse_yaml
from openrelease.verify.safetensors_header import read_safetensors_header
from openrelease.verify.signing import check_signatures, is_signature_name
from openrelease.verify.tokenizer_probe import encode_probe
from openrelease.verify.untrusted import (
    ProgressFn,
    hash_files,
    printable_name,
    read_capped,
    read_model_capped,
    unsafe_path_reason,
)

MAX_MANIFEST_BYTES = 64 << 20
MAX_TOKENIZER_BYTES = 512 << 20
MAX_YAML_BYTES = 4 << 20
MAX_YAML_NODES = 100_000
STAGE_ORDER = ("pretrain", "sft", "dpo", "distill", "grpo")
"""The default chain's order; stages of other names sort after it, by name."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".distcp", ".npz")
PICKLE_NAMES = frozenset({".metadata"})
"""torch.distributed.checkpoint's (pickled) metadata file."""
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
MOF_PATH_KEYS = frozenset({"path", "location", "component_path", "license_path"})

Severity = Literal["error", "warning"]


class Problem(BaseModel):
    """One finding: a stable code, the bundle-relative path it concerns, and what to do."""

    model_config = ConfigDict(frozen=True)

    code: str
    path: str | None
    message: str
    severity: Severity = "error"


class VerifyReport(BaseModel):
    """Result of `verify_bundle` or `verify_hub`; ``ok`` when no problem is an error."""

    target: str
    """The bundle folder, or ``hf:<repo_id>@<revision>``."""
    num_files: int = 0
    """Files whose content was checked (hashed locally; on the Hub, found and matching)."""
    num_bytes: int = 0
    missing: list[str] = Field(default_factory=list)
    """Listed in MANIFEST.json but absent."""
    extra: list[str] = Field(default_factory=list)
    """Present but not listed in MANIFEST.json."""
    changed: list[str] = Field(default_factory=list)
    """Present with a size or sha256 other than MANIFEST.json records."""
    problems: list[Problem] = Field(default_factory=list)
    signed_by: list[str] = Field(default_factory=list)
    """Key ids of the valid signatures over MANIFEST.json (``signatures/*.sig.json``)."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        """True when every check held (warnings allowed)."""
        return not any(p.severity == "error" for p in self.problems)

    def add(
        self, code: str, path: str | None, message: str, *, severity: Severity = "error"
    ) -> None:
        """Record a problem."""
        self.problems.append(Problem(code=code, path=path, message=message, severity=severity))


def load_bundle_manifest(bundle_dir: Path) -> BundleManifest:
    """Read ``bundle_dir/MANIFEST.json`` defensively (size cap, no symlink, strict schema).

    Raises:
        ArtifactError: The bundle folder or its manifest is missing, oversized or malformed.
    """
    if not bundle_dir.is_dir():
        raise ArtifactError(f"{bundle_dir} is not a folder; pass a release bundle folder.")
    path = bundle_dir / BUNDLE_MANIFEST
    if not path.is_file() and not path.is_symlink():
        raise ArtifactError(f"{path} is missing; rebuild the bundle with `openrelease bundle`.")
    return read_model_capped(path, BundleManifest, max_bytes=MAX_MANIFEST_BYTES)


# --------------------------------------------------------------------------- walking and hashing


def _symlink_message(path: Path, root: Path) -> str:
    target = Path(os.path.realpath(path))  # realpath, unlike resolve(), survives symlink loops
    where = "inside" if target.is_relative_to(root) else "OUTSIDE"
    return (
        f"is a symlink to {where} the bundle ({printable_name(str(target))}); "
        "a release holds regular files only, so it was not followed."
    )


def _walk(bundle_dir: Path, report: VerifyReport) -> dict[str, int]:
    """Return {relative path: size} of regular files; report symlinks and odd entries."""
    root = Path(os.path.realpath(bundle_dir))
    sizes: dict[str, int] = {}

    def on_error(exc: OSError) -> None:
        report.add("unreadable", printable_name(str(exc.filename)), f"cannot list: {exc.strerror}")

    for dirpath, dirnames, filenames in os.walk(bundle_dir, onerror=on_error):
        base = Path(dirpath)
        for name in [*dirnames, *filenames]:
            path = base / name
            rel = path.relative_to(bundle_dir).as_posix()
            try:
                mode, size = (info := path.lstat()).st_mode, info.st_size
            except OSError as exc:
                report.add("unreadable", printable_name(rel), f"cannot stat: {exc.strerror}")
                continue
            if printable_name(rel) != rel:
                report.add("bad_filename", printable_name(rel), "name is not UTF-8; rename it.")
            elif stat.S_ISLNK(mode):
                report.add("symlink", rel, _symlink_message(path, root))
            elif stat.S_ISREG(mode):
                sizes[rel] = size
            elif not stat.S_ISDIR(mode):
                report.add("not_regular", rel, "is a device, FIFO or socket; remove it.")
        dirnames[:] = [d for d in dirnames if not (base / d).is_symlink()]
    return sizes


# --------------------------------------------------------------------------- checks


def _check_manifest(
    manifest: BundleManifest, sizes: dict[str, int], digests: dict[str, str], report: VerifyReport
) -> None:
    seen: set[str] = set()
    for entry in manifest.files:
        path = entry.path
        if reason := unsafe_path_reason(path):
            report.add(
                "unsafe_path", printable_name(path), f"MANIFEST.json path {reason}; not read."
            )
            continue
        if path in seen:
            report.add("manifest_duplicate", path, "listed twice in MANIFEST.json.")
            continue
        seen.add(path)
        if path not in sizes:
            report.missing.append(path)
            report.add("missing_file", path, "listed in MANIFEST.json but not in the bundle.")
        elif path in digests and (digests[path], sizes[path]) != (entry.sha256, entry.size):
            report.changed.append(path)
            report.add(
                "changed_file",
                path,
                f"has {digests[path]} ({sizes[path]} bytes) but MANIFEST.json records "
                f"{entry.sha256} ({entry.size} bytes).",
            )
        elif path not in digests and sizes[path] != entry.size:
            report.changed.append(path)
            report.add(
                "changed_file",
                path,
                f"is {sizes[path]} bytes but MANIFEST.json records {entry.size} bytes "
                "(not hashed).",
            )
    for path in sorted(set(sizes) - seen):
        report.extra.append(path)
        report.add("extra_file", path, "is in the bundle but not listed in MANIFEST.json.")
    recomputed = sha256_tree({e.path: e.sha256 for e in manifest.files})
    if recomputed != manifest.bundle_digest:
        report.add(
            "manifest_digest",
            BUNDLE_MANIFEST,
            f"bundle_digest is {manifest.bundle_digest} but its file list hashes to {recomputed}; "
            "the manifest was edited after it was written.",
        )


def _check_signature_folder(walked: dict[str, int], report: VerifyReport) -> None:
    """signatures/ holds only signature files: nothing else rides along unchecked."""
    prefix = f"{BundleSection.SIGNATURES}/"
    for rel in sorted(r for r in walked if r.startswith(prefix)):
        name = rel.removeprefix(prefix)
        if "/" in name or not is_signature_name(name):
            report.add(
                "signature_folder",
                rel,
                "is not a signature (signatures/model.sig or signatures/<key id>.sig.json); it "
                "is outside MANIFEST.json "
                "and would be published unchecked: remove it.",
            )


def _check_states(sizes: dict[str, int], report: VerifyReport) -> None:
    """Every training state is pickle-free: only the portable files, nothing DCP or torch.save."""
    prefix = f"{BundleSection.STATES}/"
    for rel in sorted(r for r in sizes if r.startswith(prefix)):
        parts = rel.split("/")
        if len(parts) != 4 or STEP_DIR.fullmatch(parts[2]) is None:
            report.add("state_file", rel, "is not in a states/<stage>/step-<N>/ folder.")
        elif parts[3] not in PORTABLE_STATE_FILES:
            report.add(
                "state_file",
                rel,
                "is not part of a pickle-free training state (safetensors + JSON); replay "
                "refuses the state, and loading it could run code.",
            )


def _check_files(bundle_dir: Path, sizes: dict[str, int], report: VerifyReport) -> None:
    for rel in sorted(sizes):
        if rel.endswith(".safetensors"):
            try:
                read_safetensors_header(bundle_dir / rel)
            except ArtifactError as exc:
                report.add("safetensors_header", rel, str(exc))
        elif rel.endswith(PICKLE_SUFFIXES) or rel.rsplit("/", 1)[-1] in PICKLE_NAMES:
            report.add(
                "pickle_file",
                rel,
                "is a pickle-format file; verify never loads it, and loading it can run "
                "arbitrary code: publish safetensors instead.",
                severity="warning",
            )


def _check_tokenizer(bundle_dir: Path, sizes: dict[str, int], report: VerifyReport) -> None:
    tok_rel, probe_rel = "model/tokenizer.json", "model/tokenizer_probe.json"
    for rel in (tok_rel, probe_rel):
        if rel not in sizes:
            report.add("tokenizer", rel, "is missing; the bundled tokenizer cannot be checked.")
            return
    try:
        probe = read_model_capped(bundle_dir / probe_rel, TokenizerProbe)
    except ArtifactError as exc:
        report.add("tokenizer", probe_rel, str(exc))
        return
    try:
        text = read_capped(bundle_dir / tok_rel, max_bytes=MAX_TOKENIZER_BYTES).decode("utf-8")
    except (ArtifactError, UnicodeDecodeError) as exc:
        why = str(exc) if isinstance(exc, ArtifactError) else "is not valid UTF-8."
        report.add("tokenizer", tok_rel, why)
        return
    try:
        ids = encode_probe(text, probe.text)
    except ArtifactError as exc:
        report.add("tokenizer", tok_rel, str(exc))
        return
    if ids != probe.ids:
        first = next(
            (i for i, (a, b) in enumerate(zip(ids, probe.ids, strict=False)) if a != b),
            min(len(ids), len(probe.ids)),
        )
        report.add(
            "tokenizer_probe",
            tok_rel,
            f"encodes the probe text to {len(ids)} ids, differing from the recorded "
            f"{len(probe.ids)} ids at position {first}; the tokenizer is not the one trained.",
        )


Observed = dict[str, tuple[int, str | None]]
"""{path inside a checkpoint folder: (size, sha256, or None where only the size is known)}."""


@dataclass(frozen=True)
class CheckpointView:
    """One checkpoint as found (on disk or on the Hub): where it is, its meta.json, its files."""

    stage: str
    step: int
    where: str
    meta: CheckpointMeta | None
    files: Observed
    """Every file of the checkpoint except meta.json."""


def _check_meta_files(view: CheckpointView, meta: CheckpointMeta, report: VerifyReport) -> None:
    if (meta.stage, meta.step) != (view.stage, view.step):
        report.add(
            "checkpoint_meta",
            view.where,
            f"meta.json says {meta.stage} step {meta.step}; the checkpoint was moved or swapped.",
        )
    listed = {f.path: (f.size, f.sha256) for f in meta.files}
    for path in sorted(set(listed) | set(view.files)):
        want, got = listed.get(path), view.files.get(path)
        if want is None or got is None:
            how = "missing" if got is None else "unlisted"
        elif want[0] != got[0] or got[1] not in (None, want[1]):
            how = "changed"
        else:
            continue
        shown = f"{view.where}/{printable_name(path)}"
        report.add("checkpoint_files", shown, f"{how} vs meta.json.")
    if sha256_tree({p: d for p, (_, d) in listed.items()}) != meta.checkpoint_digest:
        report.add(
            "checkpoint_digest", view.where, "meta.json checkpoint_digest does not match its files."
        )


def bundle_stage_order(bundle_dir: Path) -> tuple[str, ...]:
    """The training stages in the order the bundle's ``configs/params.yaml`` lists them.

    The default chain when the params have no ``stages`` list (older releases) or cannot be
    read; the file is a stranger's, so it is read capped, never through a symlink, with the
    alias-free loader.
    """
    try:
        text = read_capped(Bundle(bundle_dir).params, max_bytes=MAX_YAML_BYTES).decode("utf-8")
        raw = parse_yaml(text, source=str(Bundle(bundle_dir).params))
    except (ArtifactError, ParamsError, OSError, UnicodeDecodeError, RecursionError):
        return STAGE_ORDER
    stages = raw.get("stages") if isinstance(raw, dict) else None
    entries = stages if isinstance(stages, list) else []
    names = [e["name"] for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)]
    if not names or len(names) != len(entries) or len(set(names)) != len(names):
        return STAGE_ORDER
    return tuple(names)


def stage_key(stage: str, order: tuple[str, ...] = STAGE_ORDER) -> tuple[int, str]:
    """Sort key of a stage name: its place in ``order``, then other names alphabetically."""
    return (order.index(stage) if stage in order else len(order), stage)


def _check_parent(
    view: CheckpointView,
    parent: str | None,
    *,
    prev: CheckpointView | None,
    stage_of: dict[str, str],
    report: VerifyReport,
    order: tuple[str, ...],
) -> None:
    """Within a stage the parent is the previous step; a later stage starts from an earlier one."""
    if prev is None or prev.meta is None:
        return
    if prev.stage == view.stage and parent != prev.meta.checkpoint_digest:
        report.add(
            "parent_chain",
            view.where,
            f"parent_digest {parent} is not the previous {view.stage} checkpoint "
            f"(step {prev.step}, {prev.meta.checkpoint_digest}).",
        )
    elif prev.stage != view.stage and (
        parent is None
        or (
            parent in stage_of
            and stage_key(stage_of[parent], order) >= stage_key(view.stage, order)
        )
    ):
        report.add(
            "parent_chain",
            view.where,
            f"first {view.stage} checkpoint has parent_digest {parent}, "
            "which is not a checkpoint of an earlier stage.",
        )


def _check_chain(views: list[CheckpointView], report: VerifyReport) -> None:
    """From the final checkpoint, parent digests must lead to a root (no parent) without a loop.

    Every parent named must be a checkpoint of the release: a chain that leaves the bundle is
    incomplete, and one that comes back to a checkpoint already seen is a loop.
    """
    metas = [v for v in views if v.meta is not None]
    if not metas:
        return
    by_digest: dict[str, CheckpointView] = {}
    for v in metas:  # byte-identical checkpoints share a digest: the earliest one stands
        assert v.meta is not None
        by_digest.setdefault(v.meta.checkpoint_digest, v)
    first_step = {v.stage: v.step for v in reversed(metas)}
    node: CheckpointView | None = metas[-1]
    seen: set[str] = set()  # by folder: byte-identical checkpoints are flagged elsewhere
    while node is not None and node.meta is not None:
        seen.add(node.where)
        parent = node.meta.parent_digest
        if parent is None:
            return
        if parent in by_digest and by_digest[parent].where in seen:
            report.add(
                "parent_chain",
                node.where,
                f"parent_digest {parent} leads back to a checkpoint already on the chain: "
                "the lineage loops.",
            )
            return
        if parent not in by_digest and first_step[node.stage] == node.step:
            report.add(
                "outside_base",
                node.where,
                f"the {node.stage} stage starts from {parent}, which this release does not "
                "carry: its lineage cannot be checked before that base.",
                severity="warning",
            )
            return
        if parent not in by_digest:
            report.add(
                "parent_chain",
                node.where,
                f"parent_digest {parent} is no checkpoint of this release: the lineage from "
                "the final checkpoint is incomplete.",
            )
            return
        node = by_digest[parent]


def check_lineage(
    views: list[CheckpointView], report: VerifyReport, order: tuple[str, ...] = STAGE_ORDER
) -> None:
    """Check each checkpoint against its meta.json, the parent chain, and duplicate weights.

    ``order`` is the release's stage order (`bundle_stage_order`); a later stage must start
    from an earlier one.
    """
    views = sorted(views, key=lambda v: (stage_key(v.stage, order), v.step))
    _check_chain(views, report)
    stage_of = {v.meta.checkpoint_digest: v.stage for v in views if v.meta is not None}
    by_weights: dict[tuple[tuple[str, str | None], ...], str] = {}
    prev: CheckpointView | None = None
    for view in views:
        if view.meta is not None:
            _check_meta_files(view, view.meta, report)
            _check_parent(
                view,
                view.meta.parent_digest,
                prev=prev,
                stage_of=stage_of,
                report=report,
                order=order,
            )
        prev = view
        weights = tuple(
            sorted((p, d) for p, (_, d) in view.files.items() if p.endswith(WEIGHT_SUFFIXES))
        )
        if not weights or any(d is None for _, d in weights):
            continue
        if weights in by_weights:
            report.add(
                "duplicate_weights",
                view.where,
                f"has weights byte-identical to {by_weights[weights]}; one step is mislabelled.",
            )
        by_weights.setdefault(weights, view.where)


def _check_checkpoints(
    bundle_dir: Path, sizes: dict[str, int], digests: dict[str, str], report: VerifyReport
) -> None:
    folders: dict[tuple[str, str], Observed] = {}
    for rel, digest in digests.items():
        parts = rel.split("/", 3)
        if parts[0] == BundleSection.CHECKPOINTS and len(parts) == 4:
            folders.setdefault((parts[1], parts[2]), {})[parts[3]] = (sizes[rel], digest)
    views = []
    for (stage, folder), files in folders.items():
        where = f"{BundleSection.CHECKPOINTS}/{stage}/{folder}"
        match = STEP_DIR.fullmatch(folder)
        if match is None or CHECKPOINT_META not in files:
            report.add("checkpoint_meta", where, "is not a step-<N> folder with a meta.json.")
            continue
        try:
            meta: CheckpointMeta | None = read_model_capped(
                bundle_dir / where / CHECKPOINT_META, CheckpointMeta
            )
        except ArtifactError as exc:
            report.add("checkpoint_meta", f"{where}/{CHECKPOINT_META}", str(exc))
            meta = None
        del files[CHECKPOINT_META]
        views.append(CheckpointView(stage, int(match["step"]), where, meta, files))
    order = bundle_stage_order(bundle_dir)
    check_lineage(views, report, order)
    _check_final_model(views, digests, report, order)


def _check_final_model(
    views: list[CheckpointView],
    digests: dict[str, str],
    report: VerifyReport,
    order: tuple[str, ...],
) -> None:
    """model/ must hold the final checkpoint's files, byte for byte."""
    if not views:
        return
    final = max(views, key=lambda v: (stage_key(v.stage, order), v.step))
    for path, (_, digest) in sorted(final.files.items()):
        rel = f"{BundleSection.MODEL}/{path}"
        if rel not in digests:
            report.add("final_model", rel, f"is missing; model/ must be {final.where}.")
        elif digests[rel] != digest:
            report.add(
                "final_model",
                rel,
                f"differs from {final.where}/{printable_name(path)}: model/ is not the final "
                "checkpoint's weights.",
            )


def _mof_paths(doc: Any) -> Iterator[str]:
    """Every string under a path-like key anywhere in ``doc``; each node visited once."""
    stack: list[Any] = [doc]
    seen: set[int] = set()
    while stack and len(seen) < MAX_YAML_NODES:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            for key, value in node.items():
                if key in MOF_PATH_KEYS and isinstance(value, str):
                    yield value
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


def check_mof(bundle_dir: Path, sizes: dict[str, int], report: VerifyReport) -> None:
    """Every local path that mof.yaml names must be a file or folder of the bundle."""
    if "mof.yaml" not in sizes:
        report.add("mof", "mof.yaml", "is missing; the bundle has no MOF release description.")
        return
    try:
        text = read_capped(bundle_dir / "mof.yaml", max_bytes=MAX_YAML_BYTES).decode("utf-8")
        doc = yaml.safe_load(text)
    except ArtifactError as exc:
        report.add("mof", "mof.yaml", str(exc))
        return
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError, ValueError, TypeError) as exc:
        # ValueError: a scalar YAML types but cannot build (date 2025-13-45, a 5000-digit int);
        # TypeError: a complex key (`? [a, b]`) that cannot be a dict key
        report.add("mof", "mof.yaml", f"cannot be read as YAML: {type(exc).__name__}.")
        return
    folders = {p.rsplit("/", i)[0] for p in sizes for i in range(1, p.count("/") + 1)}
    for value in _mof_paths(doc):
        path = value.strip().rstrip("/")
        if not path or "://" in path:
            continue
        if reason := unsafe_path_reason(path):
            report.add("mof_path", "mof.yaml", f"path {path[:200]!r} {reason}.")
        elif path not in sizes and path not in folders:
            report.add("mof_path", "mof.yaml", f"lists {path[:200]!r}, which is not in the bundle.")


def verify_bundle(
    bundle_dir: Path,
    *,
    progress: ProgressFn | None = None,
    num_threads: int | None = None,
    trusted_keys: list[Path] | None = None,
) -> VerifyReport:
    """Check every file, header, tokenizer, checkpoint record, mof.yaml path and signature.

    Args:
        bundle_dir: The release folder (with MANIFEST.json at its root).
        progress: Optional callback ``(bytes_done, total_bytes)`` while hashing.
        num_threads: Hashing threads; defaults to the number of CPUs.
        trusted_keys: Public keys (EC or Ed25519); when given, a valid signature by one is required.

    Returns:
        A report listing missing, extra and changed files and every problem found.

    Raises:
        ArtifactError: The folder or its MANIFEST.json is missing or unreadable.
    """
    manifest = load_bundle_manifest(bundle_dir)
    report = VerifyReport(target=str(bundle_dir))
    walked = _walk(bundle_dir, report)
    _check_signature_folder(walked, report)
    sizes = {
        rel: size
        for rel, size in walked.items()
        if rel != BUNDLE_MANIFEST and not rel.startswith(f"{BundleSection.SIGNATURES}/")
    }
    # Hash only what the manifest lists at the size it lists: an unlisted (or resized, e.g.
    # sparse) file is reported without reading its bytes.
    listed = {e.path: e.size for e in manifest.files}
    to_hash = {rel: size for rel, size in sizes.items() if listed.get(rel) == size}
    digests, errors = hash_files(bundle_dir, to_hash, progress=progress, num_threads=num_threads)
    for rel, why in sorted(errors.items()):
        report.add("unreadable", rel, f"cannot be read: {why}")
    report.num_files, report.num_bytes = len(digests), sum(sizes[p] for p in digests)
    _check_manifest(manifest, sizes, digests, report)
    _check_states(sizes, report)
    _check_files(bundle_dir, sizes, report)
    _check_tokenizer(bundle_dir, sizes, report)
    _check_checkpoints(bundle_dir, sizes, digests, report)
    check_mof(bundle_dir, sizes, report)
    _check_signatures(bundle_dir, report, trusted_keys)
    return report


def _check_signatures(
    bundle_dir: Path, report: VerifyReport, trusted_keys: list[Path] | None
) -> None:
    """Every signature must match MANIFEST.json; with trusted keys, one of them must have signed."""
    checks = check_signatures(bundle_dir, trusted_keys=trusted_keys)
    for c in checks:
        if not c.valid:
            report.add("signature", c.path, c.problem or "invalid signature")
        elif c.key_id is None:  # a model-signing signature, with no key given to check it
            report.add(
                "signature_unchecked",
                c.path,
                "is a model-signing signature; pass --trusted-key (the signer's public key) "
                "to check it.",
                severity="warning",
            )
        elif c.key_id is not None:
            report.signed_by.append(c.key_id)
            if not trusted_keys:
                report.add(
                    "signature_unpinned",
                    c.path,
                    f"valid signature by key {c.key_id}; pass --trusted-key to require a "
                    "key you trust.",
                    severity="warning",
                )
    if trusted_keys and not any(c.valid and c.trusted for c in checks):
        report.add(
            "unsigned",
            "signatures/",
            "no valid signature by a --trusted-key; the publisher signs with `openrelease sign`.",
        )
