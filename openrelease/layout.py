"""Where everything lives on disk: the one owner of every workspace and bundle path.

A workspace is a project folder that `dvc repro` fills; a bundle is the release folder
`openrelease bundle` writes from it. Every path segment either layout uses (``artifacts``,
``checkpoints``, ``step-N``, ``MANIFEST.json``, ...) is spelled here and nowhere else. Relative
paths are POSIX strings (the form records, manifests and the Hub use); the ``Workspace`` and
``Bundle`` classes turn them into paths under a root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# --------------------------------------------------------------------------- file names

STAGE_MANIFEST = "manifest.json"
"""A stage's list of release checkpoints (and the data stage's manifest)."""
RECORD = "record.json"
"""A stage's provenance record."""
METRICS = "metrics.jsonl"
"""A training stage's per-step metrics."""
BundleManifestName = Literal["MANIFEST.json"]
BUNDLE_MANIFEST: BundleManifestName = "MANIFEST.json"
"""The sha256 of every file of a bundle."""
CHECKPOINT_META = "meta.json"
"""One checkpoint's or state's identity: stage, step, digests."""
STATE_FILE = "state.json"
"""Marks a complete resumable training state."""
WEIGHTS = "model.safetensors"
PORTABLE_CACHE = ".openrelease/portable"
"""The pickle-free copies of workspace training states, the form a bundle ships (see below):
``<stage>/step-N``. Outside the training stages' DVC outputs, which the bundle never writes."""
STATE_MODEL = "model-state.safetensors"
STATE_OPTIM = "optim-state.safetensors"
STATE_OPTIM_JSON = "optim-state.json"
STATE_RNG = "rng-state.safetensors"
PORTABLE_STATE_FILES = frozenset(
    {STATE_FILE, STATE_MODEL, STATE_OPTIM, STATE_OPTIM_JSON, STATE_RNG}
)
"""Every file a pickle-free training state holds (all of a bundle's ``states/<stage>/step-N``):
full model and optimizer tensors and every rank's RNG streams as safetensors, the rest JSON."""
CERTIFICATE = "certificate.json"
TOKENIZER_PROBE = "tokenizer_probe.json"
PARAMS = "params.yaml"
AUDIT = "audit.json"
TMP_PREFIX = ".tmp-"
"""Folders being written; renamed into place when complete."""
DATASET_CARD = "data/README.md"
"""The dataset repo's card in a bundle; publish puts it (and data/croissant.json) at the
dataset repo's root."""
ALLOWED_SECRETS = "allowed_secrets.json"
"""At a bundle's root: the secret-like matches it carries on purpose (test fixtures)."""
HUB_CACHE = ".openrelease/hub"
"""Files fetched from the Hugging Face Hub, one folder per repo commit (checked on every use)."""
DATA_POINTERS = "pointers.json"
"""In a bundle's ``data/``: the URL and sha256 of each data file the bundle does not carry."""

# --------------------------------------------------------------------------- step folders

_STEP_PREFIX = "step-"


def step_name(step: int) -> str:
    """``step-<step>``: the folder name of one checkpoint, state or eval result."""
    return f"{_STEP_PREFIX}{step}"


def step_of(name: str) -> int | None:
    """The step a ``step-<N>`` name stands for, or None for any other name."""
    digits = name.removeprefix(_STEP_PREFIX)
    if digits == name or not digits.isdigit():
        return None
    return int(digits)


# --------------------------------------------------------------------------- workspace

ARTIFACTS = "artifacts"
EVAL_STAGE = "eval"
RELEASE_DIR = "release"


def stage_rel(stage: str) -> str:
    """``artifacts/<stage>``: a stage's output folder, relative to the workspace."""
    return f"{ARTIFACTS}/{stage}"


def checkpoints_rel(stage: str) -> str:
    """``artifacts/<stage>/checkpoints``, relative to the workspace."""
    return f"{stage_rel(stage)}/checkpoints"


def states_rel(stage: str) -> str:
    """``artifacts/<stage>/states``, relative to the workspace."""
    return f"{stage_rel(stage)}/states"


def checkpoint_rel(stage: str, step: int) -> str:
    """``artifacts/<stage>/checkpoints/step-N``, relative to the workspace."""
    return f"{stage_rel(stage)}/checkpoints/{step_name(step)}"


def state_rel(stage: str, step: int) -> str:
    """``artifacts/<stage>/states/step-N``, relative to the workspace."""
    return f"{stage_rel(stage)}/states/{step_name(step)}"


EVAL_RESULTS = "results"


def eval_result_rel(stage: str, step: int) -> str:
    """``results/<stage>/step-N.json``, relative to the eval folder (workspace and bundle)."""
    return f"{EVAL_RESULTS}/{stage}/{step_name(step)}.json"


def eval_samples_rel(stage: str) -> str:
    """``samples/<stage>.jsonl``, relative to the eval folder (workspace and bundle)."""
    return f"samples/{stage}.jsonl"


EVAL_METRICS = "metrics.json"
EVAL_CURVE = "curve.csv"
EVAL_PLOTS = "plots"
EVAL_LM_EVAL = "lm_eval.json"
"""lm-evaluation-harness scores and their settings, keyed by checkpoint digest (DVC metrics)."""
EVAL_LM_EVAL_CURVE = "lm_eval.csv"
"""lm-evaluation-harness scores per scored checkpoint, for `dvc plots`."""
EVAL_CURVES = "curves"
"""``curves/<stage>.csv``: one eval curve per training stage (DVC plots, one plot each)."""


def eval_curve_rel(stage: str) -> str:
    """``curves/<stage>.csv``, relative to the eval folder."""
    return f"{EVAL_CURVES}/{stage}.csv"


# --------------------------------------------------------------------------- project (DVC)

DVC_FILE = "dvc.yaml"
"""The pipeline, generated from params by `openrelease pipeline sync`."""
PROJECT_STATE = ".openrelease"
"""openrelease's own folder in a project: the journal (ignored by git) and code.json."""
CODE_IDENTITY_REL = f"{PROJECT_STATE}/code.json"
"""The installed openrelease's version and file digest: every stage's code dependency."""
AUDIT_METRICS_REL = f"{ARTIFACTS}/audit/metrics.json"
"""The audit stage's DVC metric: ``{"mof_class": N}`` (1-3, 0 unclassified)."""


@dataclass(frozen=True)
class Workspace:
    """The paths of one project folder."""

    root: Path

    @property
    def artifacts(self) -> Path:
        """``artifacts/``: every stage's outputs."""
        return self.root / ARTIFACTS

    @property
    def params(self) -> Path:
        """``params.yaml``."""
        return self.root / PARAMS

    def stage_dir(self, stage: str) -> Path:
        """``artifacts/<stage>``."""
        return self.root / stage_rel(stage)

    def data(self, out_dir: str) -> Path:
        """The data stage's folder: ``out_dir`` (params ``data.out_dir``) under the root."""
        return self.root / out_dir

    def checkpoints(self, stage: str) -> Path:
        """``artifacts/<stage>/checkpoints``: the release checkpoints."""
        return self.stage_dir(stage) / "checkpoints"

    def checkpoint(self, stage: str, step: int) -> Path:
        """``artifacts/<stage>/checkpoints/step-N``."""
        return self.root / checkpoint_rel(stage, step)

    def states(self, stage: str) -> Path:
        """``artifacts/<stage>/states``: resumable training states (DVC does not track them)."""
        return self.stage_dir(stage) / "states"

    def state(self, stage: str, step: int) -> Path:
        """``artifacts/<stage>/states/step-N``."""
        return self.root / state_rel(stage, step)

    def stage_manifest(self, stage: str) -> Path:
        """``artifacts/<stage>/manifest.json``."""
        return self.stage_dir(stage) / STAGE_MANIFEST

    def record(self, stage: str) -> Path:
        """``artifacts/<stage>/record.json``."""
        return self.stage_dir(stage) / RECORD

    def metrics(self, stage: str) -> Path:
        """``artifacts/<stage>/metrics.jsonl``."""
        return self.stage_dir(stage) / METRICS

    @property
    def eval_dir(self) -> Path:
        """``artifacts/eval``."""
        return self.stage_dir(EVAL_STAGE)

    @property
    def eval_results(self) -> Path:
        """``artifacts/eval/results``: one JSON per evaluated checkpoint."""
        return self.eval_dir / EVAL_RESULTS

    def eval_result(self, stage: str, step: int) -> Path:
        """``artifacts/eval/results/<stage>/step-N.json``."""
        return self.eval_dir / eval_result_rel(stage, step)

    @property
    def certificate(self) -> Path:
        """``artifacts/certificate.json``: the last `bundle --certify` replay."""
        return self.artifacts / CERTIFICATE

    @property
    def release(self) -> Path:
        """``release/``: the bundle `dvc repro` builds."""
        return self.root / RELEASE_DIR

    @property
    def audit(self) -> Path:
        """``audit.json``: the audit report of ``release/``."""
        return self.root / AUDIT

    def portable_state(self, stage: str, step: int) -> Path:
        """``.openrelease/portable/<stage>/step-N``: the pickle-free copy of a training state."""
        return self.root / PORTABLE_CACHE / stage / step_name(step)

    def hub_snapshot(self, repo_type: str, repo: str, commit: str) -> Path:
        """``.openrelease/hub/<type>s/<ORG>/<NAME>/<commit>``: one Hub commit's fetched files."""
        return self.root / HUB_CACHE / f"{repo_type}s" / repo / commit

    def hub_pin(self, repo_type: str, repo: str, commit: str) -> Path:
        """``<commit>.pin.json`` beside a snapshot: its `PinnedSource`, once checked.

        Written when every file was checked against the Hub; a later run uses the snapshot
        without the Hub.
        """
        return self.root / HUB_CACHE / f"{repo_type}s" / repo / f"{commit}.pin.json"


# --------------------------------------------------------------------------- bundle

CERTIFICATE_REL = f"{ARTIFACTS}/{CERTIFICATE}"
"""The certificate's place, relative to the workspace (the bundle keeps it at its root)."""


def bundle_checkpoint_rel(stage: str, step: int) -> str:
    """``checkpoints/<stage>/step-N`` in a bundle."""
    return f"checkpoints/{stage}/{step_name(step)}"


BUNDLE_CHECKPOINT_DIR = r"checkpoints/[^/]+/step-\d+"
"""Regex source of a checkpoint folder in a bundle (no groups, for composing rules)."""
BUNDLE_CHECKPOINT_FILE = re.compile(r"checkpoints/(?P<stage>[^/]+)/step-(?P<step>\d+)/(?P<rest>.+)")
"""A file of a bundle checkpoint: ``checkpoints/<stage>/step-N/<rest>``."""
STEP_DIR = re.compile(r"step-(?P<step>\d+)")
"""A ``step-N`` folder name."""


def bundle_state_rel(stage: str, step: int) -> str:
    """``states/<stage>/step-N`` in a bundle."""
    return f"states/{stage}/{step_name(step)}"


def bundle_log_rel(stage: str, name: str) -> str:
    """``logs/<stage>/<name>`` in a bundle (``metrics.jsonl``, ``record.json``)."""
    return f"logs/{stage}/{name}"


# --------------------------------------------------------------------------- Hub branches

PUBLISH_MARKER = "PUBLISHING_IN_PROGRESS.md"
"""On ``main`` while `publish` runs: the release there is incomplete until it is gone."""
STAGING_BRANCH = "openrelease-staging"
"""Where publish commits a new checkpoint before creating its branch at that commit."""
HUB_BRANCHES = "branches.json"
"""At a bundle's root: the Hub branch of every checkpoint (``release.branch_name``)."""
LEGACY_BRANCH = "{stage}-step{step}"
"""Branch names of bundles that carry no branches.json."""
HUB_BRANCH = re.compile(
    r"(?:(?P<stage>[A-Za-z0-9_.]+)-)?step-?(?P<step>\d+)"
    r"(?:-tokens(?P<tokens>\d+(?:\.\d+)?)(?P<unit>[KMBT]?)B?)?"
)
"""A checkpoint branch as releases name them: ``step1000`` (Pythia), ``pretrain-step200``,
``stage1-step1000-tokens5B`` (OLMo), ``pretrain-step200-tokens12M`` (ours)."""
_TOKEN_UNITS = (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3))


def format_tokens(num_tokens: int) -> str:
    """``12M``, ``1.5B``, ``830K``: 3 significant digits with a unit; exact below 1000."""
    for unit, scale in _TOKEN_UNITS:
        value = float(f"{num_tokens / scale:.3g}")
        if value >= 1:
            return f"{value:g}{unit}"
    return str(num_tokens)


def branch_tokens(match: re.Match[str]) -> float | None:
    """The token count a `HUB_BRANCH` match names (None when it names none)."""
    if match["tokens"] is None:
        return None
    return float(match["tokens"]) * dict(_TOKEN_UNITS).get(match["unit"], 1)


def hub_branch(template: str, *, stage: str, step: int, tokens: int) -> str:
    """A checkpoint's branch name from the ``release.branch_name`` template."""
    return template.format(
        stage=stage, step=step, tokens=format_tokens(tokens), tokens_exact=tokens
    )


DATASET_ROOT_FILES = (DATASET_CARD, "data/croissant.json")
"""Bundle files that go to the dataset repo's root (the card, and Croissant beside it)."""


def dataset_repo_path(bundle_path: str) -> str:
    """Where a bundle ``data/...`` file lies in the dataset repo."""
    if bundle_path in DATASET_ROOT_FILES:
        return bundle_path.rsplit("/", 1)[-1]
    return bundle_path


class BundleSection:
    """The top-level folders of a bundle, one per kind of MOF evidence."""

    MODEL = "model"
    CHECKPOINTS = "checkpoints"
    STATES = "states"
    DATA = "data"
    EVALS = "evals"
    LOGS = "logs"
    CONFIGS = "configs"
    CODE = "code"
    DOCS = "docs"
    SBOM = "sbom"
    LICENSES = "licenses"
    SIGNATURES = "signatures"
    BASE_MODEL = "base_model"
    """The base model's files, when ``release.include_base_model`` copies them."""


BUNDLE_PARAMS = f"{BundleSection.CONFIGS}/{PARAMS}"


@dataclass(frozen=True)
class Bundle:
    """The paths of one release bundle."""

    root: Path

    @property
    def manifest(self) -> Path:
        """``MANIFEST.json``."""
        return self.root / BUNDLE_MANIFEST

    @property
    def params(self) -> Path:
        """``configs/params.yaml``."""
        return self.root / BUNDLE_PARAMS

    @property
    def data_dir(self) -> Path:
        """``data/``."""
        return self.root / BundleSection.DATA

    @property
    def base_model(self) -> Path:
        """``base_model/``: the files of the base model the chain started from, if shipped."""
        return self.root / BundleSection.BASE_MODEL

    def checkpoints(self, stage: str) -> Path:
        """``checkpoints/<stage>``."""
        return self.root / BundleSection.CHECKPOINTS / stage

    def checkpoint(self, stage: str, step: int) -> Path:
        """``checkpoints/<stage>/step-N``."""
        return self.root / bundle_checkpoint_rel(stage, step)

    def states(self, stage: str) -> Path:
        """``states/<stage>``."""
        return self.root / BundleSection.STATES / stage

    def state(self, stage: str, step: int) -> Path:
        """``states/<stage>/step-N``."""
        return self.root / bundle_state_rel(stage, step)

    @property
    def eval_dir(self) -> Path:
        """``evals/``: the same layout as a workspace's ``artifacts/eval``."""
        return self.root / BundleSection.EVALS

    def log(self, stage: str, name: str) -> Path:
        """``logs/<stage>/<name>``."""
        return self.root / bundle_log_rel(stage, name)

    def record(self, stage: str) -> Path:
        """``logs/<stage>/record.json``."""
        return self.log(stage, RECORD)

    def metrics(self, stage: str) -> Path:
        """``logs/<stage>/metrics.jsonl``."""
        return self.log(stage, METRICS)

    @property
    def signatures(self) -> Path:
        """``signatures/``: detached signatures, never listed in MANIFEST.json."""
        return self.root / BundleSection.SIGNATURES

    def is_bundle(self) -> bool:
        """True when the folder holds a MANIFEST.json and configs/params.yaml."""
        return self.manifest.is_file() and self.params.is_file()
