"""Check a release published on the Hugging Face Hub against its MANIFEST.json and meta.json.

Uses file listings (size, LFS sha256) of every branch; downloads only MANIFEST.json and meta.json.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import HfApi
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from openrelease.digest import PREFIX, sha256_bytes
from openrelease.errors import ArtifactError
from openrelease.layout import (
    BUNDLE_CHECKPOINT_FILE,
    BUNDLE_MANIFEST,
    CHECKPOINT_META,
    HUB_BRANCH,
    HUB_BRANCHES,
    LEGACY_BRANCH,
    PUBLISH_MARKER,
    branch_tokens,
    bundle_checkpoint_rel,
    dataset_repo_path,
)
from openrelease.manifest import BundleManifest, CheckpointMeta, HubBranches, validate_model
from openrelease.verify.bundle import (
    MAX_MANIFEST_BYTES,
    WEIGHT_SUFFIXES,
    CheckpointView,
    Observed,
    Problem,
    VerifyReport,
    check_lineage,
)
from openrelease.verify.untrusted import (
    ModelT,
    parse_json_bytes,
    read_capped,
    unsafe_path_reason,
)

MAX_META_BYTES = 16 << 20
BRANCH = re.compile(r"(?P<stage>[a-z0-9_]+)-step(?P<step>\d+)")
"""Checkpoint branches of bundles without branches.json: ``<stage>-step<N>``."""
_NOT_RECORDED = frozenset({".gitattributes", BUNDLE_MANIFEST, PUBLISH_MARKER})
DATA = "data"
"""Listing key of the dataset repo ``<repo_id>-data``."""

Location = tuple[str, str]
"""(listing key: a model-repo revision or DATA, path in that repo)."""

HUB_ERRORS = (HfHubHTTPError, EntryNotFoundError, httpx2.TransportError)
"""What a Hub request can raise: an HTTP error answer, a download that found nothing (its
cause is the HTTP or transport error), or no answer at all (refused, reset, timed out)."""
_HINTS = {
    401: "the token is missing or invalid; set HF_TOKEN or run `hf auth login`",
    403: "the token cannot do this here; use a token with access to this namespace",
    404: "the repo, revision or file does not exist or is not visible with this token",
}


def describe_hub_error(exc: BaseException) -> tuple[str, str]:
    """What went wrong talking to the Hub, and what to do; one line each, never a token.

    Returns:
        ``(what happened, what to do)``, e.g. ``("HTTP 429: slow down", "... retry after 30 s")``.
    """
    if not isinstance(exc, HfHubHTTPError | httpx2.TransportError) and exc.__cause__ is not None:
        exc = exc.__cause__  # hf_hub_download wraps the real failure
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        detail = " ".join((exc.server_message or str(exc).splitlines()[0]).split())[:200]
        if status == 429:
            after = exc.response.headers.get("Retry-After", "").strip()
            wait = f"retry after {after} s" if after.isdigit() else "wait a few minutes and retry"
            return f"HTTP 429: {detail}", f"the Hub is rate-limiting; {wait}"
        hint = _HINTS.get(status, "the Hub failed; retry later" if status >= 500 else "")
        return f"HTTP {status}: {detail}", hint or "check the repo id, revision and endpoint"
    what = " ".join(str(exc).split())[:200] or type(exc).__name__
    if isinstance(exc, httpx2.TransportError):
        return f"no answer: {what}", "check --endpoint / HF_ENDPOINT and the network"
    return f"{type(exc).__name__}: {what}", "check the repo id, revision and endpoint"


def checkpoint_branch(stage: str, step: int, branches: Mapping[str, str] | None = None) -> str:
    """The branch of checkpoint (stage, step): from branches.json, else ``<stage>-step<N>``."""
    recorded = (branches or {}).get(bundle_checkpoint_rel(stage, step))
    return recorded or LEGACY_BRANCH.format(stage=stage, step=step)


def hub_locations(
    path: str, *, main: str, branches: Mapping[str, str] | None = None
) -> list[Location]:
    """Where `publish_bundle` puts a bundle file, then the plain bundle path on ``main``.

    ``model/X`` -> ``X`` on main; ``checkpoints/<stage>/step-<N>/X`` -> ``X`` on the
    checkpoint's branch (`checkpoint_branch`); ``data/...`` -> the dataset repo
    ``<repo_id>-data`` (its card and Croissant at the root); else as is.
    """
    if match := BUNDLE_CHECKPOINT_FILE.fullmatch(path):
        branch = checkpoint_branch(match["stage"], int(match["step"]), branches)
        return [(branch, match["rest"]), (main, path)]
    if path.startswith("model/"):
        return [(main, path.removeprefix("model/")), (main, path)]
    if path.startswith("data/"):
        return [(DATA, dataset_repo_path(path)), (main, path)]
    return [(main, path)]


@dataclass(frozen=True)
class _Hub:
    api: HfApi
    repo_id: str
    tmp_dir: Path

    def listing(self, revision: str, *, repo_type: str = "model") -> Observed:
        """{path: (size, sha256 for LFS files or None)} of every file at ``revision``."""
        repo_id = self.repo_id + ("-data" if repo_type == "dataset" else "")
        tree = self.api.list_repo_tree(
            repo_id, recursive=True, revision=revision, repo_type=repo_type
        )
        return {
            item.path: (item.size, PREFIX + item.lfs.sha256 if item.lfs is not None else None)
            for item in tree
            if isinstance(item, RepoFile)
        }

    def record(
        self, path: str, model: type[ModelT], *, revision: str, size: int, max_bytes: int
    ) -> tuple[ModelT, str]:
        """Download one small JSON record, validate it, and return it with its sha256."""
        where = f"hf:{self.repo_id}@{revision}/{path}"
        if size > max_bytes:
            raise ArtifactError(f"{where} is {size} bytes, above the {max_bytes}-byte limit.")
        local_dir = self.tmp_dir / re.sub(r"[^A-Za-z0-9_.-]", "_", revision)
        local = self.api.hf_hub_download(self.repo_id, path, revision=revision, local_dir=local_dir)
        data = read_capped(Path(local), max_bytes=max_bytes)
        record = validate_model(parse_json_bytes(data, where=where), model, where=where)
        return record, sha256_bytes(data)


def branch_problems(listings: Mapping[str, Observed]) -> list[Problem]:
    """What a checkpoint branch layout gets wrong, from file listings alone (no downloads).

    ``listings`` maps each checkpoint branch (a `HUB_BRANCH` name: ``step1000``,
    ``stage1-step1000-tokens5B``, ...) to its files with LFS sha256s. Flags branches serving
    weights byte-identical to another branch's (Pythia's and OLMo's mislabelled steps), and
    names whose token count goes down while the step goes up within a stage.
    """
    problems: list[Problem] = []
    parsed = {n: m for n in listings if (m := HUB_BRANCH.fullmatch(n)) is not None}
    by_stage: dict[str, list[tuple[int, float | None, str]]] = {}
    for name, match in parsed.items():
        by_stage.setdefault(match["stage"] or "", []).append(
            (int(match["step"]), branch_tokens(match), name)
        )
    seen: dict[tuple[tuple[str, str], ...], str] = {}
    for stage in sorted(by_stage):
        runs = sorted(by_stage[stage])
        for (step, tokens, name), (p_step, p_tokens, p_name) in zip(runs[1:], runs, strict=False):
            if tokens is not None and p_tokens is not None and tokens < p_tokens and step > p_step:
                problems.append(
                    Problem(
                        code="names_backwards",
                        path=name,
                        message=f"names fewer tokens than {p_name} at an earlier step; one of "
                        "the two names is wrong.",
                    )
                )
        for _, _, name in runs:
            weights = tuple(
                sorted(
                    (p, d)
                    for p, (_, d) in listings[name].items()
                    if p.endswith(WEIGHT_SUFFIXES) and d is not None
                )
            )
            if not weights:
                continue
            if weights in seen:
                problems.append(
                    Problem(
                        code="duplicate_weights",
                        path=name,
                        message=f"serves weights byte-identical to {seen[weights]} (same LFS "
                        "sha256); one step is mislabelled.",
                    )
                )
            seen.setdefault(weights, name)
    return problems


def _compare_files(
    manifest: BundleManifest,
    listings: dict[str, Observed],
    *,
    main: str,
    branches: Mapping[str, str],
    report: VerifyReport,
) -> None:
    claimed: set[Location] = set()
    for entry in manifest.files:
        if reason := unsafe_path_reason(entry.path):
            report.add("unsafe_path", entry.path[:200], f"MANIFEST.json path {reason}.")
            continue
        places = hub_locations(entry.path, main=main, branches=branches)
        where = next((p for p in places if p[1] in listings.get(p[0], {})), None)
        if where is None:
            report.missing.append(entry.path)
            report.add("missing_file", entry.path, f"not on the Hub (expected at {places[0]}).")
            continue
        claimed.add(where)
        size, sha = listings[where[0]][where[1]]
        if size != entry.size or sha not in (None, entry.sha256):
            report.changed.append(entry.path)
            report.add(
                "changed_file",
                entry.path,
                f"{where[0]}:{where[1]} on the Hub is {sha or 'a file'} ({size} bytes) but "
                f"MANIFEST.json records {entry.sha256} ({entry.size} bytes).",
            )
        else:
            report.num_files += 1
            report.num_bytes += size
    for key in (main, DATA):
        for path in sorted(set(listings.get(key, {})) - _NOT_RECORDED):
            if (key, path) not in claimed and not path.startswith("signatures/"):
                shown = f"{key}:{path}"
                report.extra.append(shown)
                report.add("extra_file", shown, "is on the Hub but not in MANIFEST.json.")


def _checkpoint_view(
    hub: _Hub,
    revision: str,
    listing: Observed,
    *,
    checkpoint: tuple[str, int],
    report: VerifyReport,
) -> CheckpointView | None:
    """One checkpoint on ``revision``: its files at the root or at their bundle path."""
    stage, step = checkpoint
    bundle_prefix = f"{bundle_checkpoint_rel(stage, step)}/"
    prefix = bundle_prefix if bundle_prefix + CHECKPOINT_META in listing else ""
    where = f"{revision}:{prefix}".rstrip(":/")
    if prefix + CHECKPOINT_META not in listing:
        report.add("checkpoint_meta", where, "has no meta.json.")
        return None
    try:
        meta, digest = hub.record(
            prefix + CHECKPOINT_META,
            CheckpointMeta,
            revision=revision,
            size=listing[prefix + CHECKPOINT_META][0],
            max_bytes=MAX_META_BYTES,
        )
    except ArtifactError as exc:
        report.add("checkpoint_meta", where, str(exc))
        return None
    # Now that it is downloaded, its sha256 is known: the manifest comparison uses it.
    listing[prefix + CHECKPOINT_META] = (listing[prefix + CHECKPOINT_META][0], digest)
    # A branch root also holds the card that publish generates; it is not a checkpoint file.
    generated = {CHECKPOINT_META, *_NOT_RECORDED} | ({"README.md"} if not prefix else set())
    listed = {f.path for f in meta.files}
    files = {
        p[len(prefix) :]: v
        for p, v in listing.items()
        if p.startswith(prefix)
        and (p[len(prefix) :] not in generated or p[len(prefix) :] in listed)
    }
    return CheckpointView(stage, step, where, meta, files)


def _checkpoints(
    hub: _Hub,
    listings: dict[str, Observed],
    *,
    main: str,
    branches: Mapping[str, str],
    report: VerifyReport,
) -> list[CheckpointView]:
    """Every checkpoint: one per checkpoint branch, plus any kept only on main."""
    where: dict[tuple[str, int], str] = {}
    recorded = {b: BUNDLE_CHECKPOINT_FILE.fullmatch(f"{d}/x") for d, b in branches.items()}
    for name in listings:
        if name in (main, DATA):
            continue
        if (found := recorded.get(name)) is not None:
            where[(found["stage"], int(found["step"]))] = name
        elif not branches and (match := BRANCH.fullmatch(name)):
            where[(match["stage"], int(match["step"]))] = name
    for path in listings[main]:
        if (found := BUNDLE_CHECKPOINT_FILE.fullmatch(path)) and found["rest"] == CHECKPOINT_META:
            where.setdefault((found["stage"], int(found["step"])), main)
    views = [
        _checkpoint_view(hub, rev, listings[rev], checkpoint=c, report=report)
        for c, rev in sorted(where.items())
    ]
    return [v for v in views if v is not None]


def _read_listings(hub: _Hub, main: str) -> dict[str, Observed]:
    listings = {main: hub.listing(main)}
    for branch in hub.api.list_repo_refs(hub.repo_id).branches:
        if HUB_BRANCH.fullmatch(branch.name) and branch.name != main:
            listings[branch.name] = hub.listing(branch.name)
    try:
        listings[DATA] = hub.listing(main, repo_type="dataset")
    except (RepositoryNotFoundError, RevisionNotFoundError):
        listings[DATA] = {}
    return listings


PROBE_TIMEOUT_S = 10.0


def probe_endpoint(api: HfApi, repo_id: str) -> None:
    """One request to the Hub before the real ones, so that a Hub that does not answer fails now.

    huggingface_hub retries a connection error five times with back-off (about 24 s, a warning
    each time); any HTTP answer here (even 401 or 404) means the Hub is there.

    Raises:
        httpx2.TransportError: No answer (refused, reset, timed out, name unknown).
    """
    from huggingface_hub import get_session

    get_session().head(f"{api.endpoint}/api/models/{repo_id}", timeout=PROBE_TIMEOUT_S)


def verify_hub(
    repo_id: str,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
) -> VerifyReport:
    """Check a release published by `publish_bundle` without downloading weights.

    ``revision`` (default ``main``) must hold MANIFEST.json. Every file it lists must be where
    `hub_locations` says; LFS files are compared by sha256 and size, other files by size. Each
    checkpoint branch is checked against its meta.json, the parent chain, and for weights
    byte-identical to another step's.

    Args:
        repo_id: ``org/name`` of the model repo (data is read from ``org/name-data``).
        endpoint: Hub URL; None uses huggingface_hub's default.
        token: Access token, False for anonymous access, None for the saved token.
        revision: Branch or tag holding the release's MANIFEST.json.

    Returns:
        The report, with target ``hf:<repo_id>@<revision>``.

    Raises:
        ArtifactError: The repo, revision or MANIFEST.json cannot be read.
    """
    main = revision or "main"
    report = VerifyReport(target=f"hf:{repo_id}@{main}")
    try:
        with tempfile.TemporaryDirectory(prefix="openrelease-verify-") as tmp:
            hub = _Hub(HfApi(endpoint=endpoint, token=token), repo_id, Path(tmp))
            probe_endpoint(hub.api, repo_id)
            listings = _read_listings(hub, main)
            checkpoints = {k: v for k, v in listings.items() if k not in (main, DATA)}
            if BUNDLE_MANIFEST not in listings[main]:
                if PUBLISH_MARKER in listings[main]:
                    raise ArtifactError(
                        f"hf:{repo_id}@{main} is incomplete: a publish was interrupted "
                        f"({PUBLISH_MARKER}); rerun `openrelease publish` to finish it."
                    )
                if not checkpoints:
                    raise ArtifactError(
                        f"hf:{repo_id}@{main} has no {BUNDLE_MANIFEST} and no checkpoint "
                        "branches; there is nothing to verify."
                    )
                # Someone else's release: its checkpoint branches, from listings alone.
                report.add(
                    "no_manifest",
                    f"{main}:{BUNDLE_MANIFEST}",
                    "is absent: files are not checked against a manifest, only the "
                    f"{len(checkpoints)} checkpoint branches against each other.",
                    severity="warning",
                )
                report.problems.extend(branch_problems(checkpoints))
                return report
            manifest, _ = hub.record(
                BUNDLE_MANIFEST,
                BundleManifest,
                revision=main,
                size=listings[main][BUNDLE_MANIFEST][0],
                max_bytes=MAX_MANIFEST_BYTES,
            )
            branches: dict[str, str] = {}
            if HUB_BRANCHES in listings[main]:
                recorded, _ = hub.record(
                    HUB_BRANCHES,
                    HubBranches,
                    revision=main,
                    size=listings[main][HUB_BRANCHES][0],
                    max_bytes=MAX_META_BYTES,
                )
                branches = recorded.branches
            views = _checkpoints(hub, listings, main=main, branches=branches, report=report)
    except HUB_ERRORS as exc:
        what, hint = describe_hub_error(exc)
        raise ArtifactError(f"hf:{repo_id}@{main} cannot be read ({what}); {hint}.") from None
    if PUBLISH_MARKER in listings[main]:
        report.add(
            "incomplete_release",
            f"{main}:{PUBLISH_MARKER}",
            "a publish was interrupted: main may lack files of the release; rerun "
            "`openrelease publish` to finish it.",
        )
    _compare_files(manifest, listings, main=main, branches=branches, report=report)
    check_lineage(views, report)  # duplicate weights among the manifest's checkpoints
    report.problems.extend(p for p in branch_problems(checkpoints) if p.code == "names_backwards")
    return report
