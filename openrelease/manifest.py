"""On-disk JSON: deterministic, atomic writes and schema-checked reads of our records.

Every JSON file openrelease writes goes through `write_json`; no file is ever half-written.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from openrelease.errors import ArtifactError
from openrelease.safeio import read_json_file

ModelT = TypeVar("ModelT", bound=BaseModel)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def dump_json(obj: Any) -> str:
    """Render ``obj`` the house way: sorted keys, indent 2, trailing newline, no NaN."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` (a pydantic model or JSON-able value) to ``path`` atomically."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    write_text_atomic(path, dump_json(obj))


def read_json(path: Path) -> Any:
    """Read a JSON file strictly (`openrelease.safeio`); a bad one is an `ArtifactError`."""
    if not path.exists() and not path.is_symlink():
        raise ArtifactError(f"{path} is missing; run the stage that writes it.", path=str(path))
    return read_json_file(path)


def validate_model(raw: Any, model: type[ModelT], *, where: str, fix: str = "") -> ModelT:
    """Validate ``raw`` against ``model``; the first schema error becomes an `ArtifactError`.

    ``fix`` (e.g. "; re-run the stage that writes it") ends the message.
    """
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ArtifactError(
            f"{where} does not match the {model.__name__} schema at {loc}: {first['msg']}{fix}.",
            path=where,
        ) from None


def read_model(path: Path, model: type[ModelT]) -> ModelT:
    """Read ``path`` and validate it against the pydantic schema ``model``."""
    return validate_model(
        read_json(path), model, where=str(path), fix="; re-run the stage that writes it"
    )


# --------------------------------------------------------------------------- schemas


class Record(BaseModel):
    """Base of every schema we write: strict and immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(Record):
    """One file of a folder: POSIX path relative to the folder root, size and digest."""

    path: str
    size: int
    sha256: str


class PinnedSource(Record):
    """A model, tokenizer or dataset taken from the Hugging Face Hub (or a local folder).

    Pinned by content: the commit a revision resolved to and the sha256 of every file used,
    each checked against the Hub's own digests (LFS sha256, git blob sha1) before use.
    """

    kind: Literal["hf", "local"]
    repo: str
    """``ORG/NAME`` on the Hub, or the folder path relative to the project (kind local)."""
    repo_type: Literal["model", "dataset"] = "model"
    revision: str | None
    """The revision asked for: a commit sha, or a branch/tag when floating was allowed."""
    commit: str | None
    """The commit sha the revision resolved to (kind hf)."""
    files: tuple[FileEntry, ...]
    """Every file used, with its sha256."""
    digest: str
    """sha256_tree over ``files``: the identity of what was used."""
    license: str | None = None
    """The source's license tag (the Hub card's ``license`` or the params), when known."""

    @property
    def uri(self) -> str:
        """``hf:ORG/NAME@SHA`` (or the local folder path): how records name the source."""
        return f"hf:{self.repo}@{self.commit}" if self.kind == "hf" else self.repo


BASE_MODEL_RELATION = "finetune"
"""A Hub card's ``base_model_relation`` for a model trained from a base: every weight trained."""


class CheckpointFacts(Record):
    """What the trainer knows about a release checkpoint besides its files."""

    stage: str
    step: int
    tokens_seen: int
    samples_seen: int
    sample_range: tuple[int, int]
    """Global sample positions [start, end) consumed since the previous checkpoint."""
    data_digest: str
    """Digest of the data order (sample ids) consumed in ``sample_range``."""
    loss: float | None
    params_digest: str
    parent_digest: str | None
    """``checkpoint_digest`` of the previous checkpoint (or of the init checkpoint); null at
    the very start of pretraining."""
    base_model: PinnedSource | None = None
    """The existing model this checkpoint's chain started from (a stage's ``from:
    hf:ORG/NAME@REVISION`` or folder); null when the chain started from random weights."""


class CheckpointMeta(CheckpointFacts):
    """``meta.json`` beside every release checkpoint (an HF ``save_pretrained`` folder)."""

    schema_version: Literal[1] = 1
    files: tuple[FileEntry, ...]
    """Every file of the checkpoint folder except meta.json."""
    checkpoint_digest: str
    """sha256_tree over ``files``: the identity of this checkpoint."""


class StageManifest(Record):
    """The small per-stage DVC out that later stages depend on: its checkpoints and digests."""

    schema_version: Literal[1] = 1
    stage: str
    final_step: int
    final_checkpoint: str
    """Path of the final checkpoint folder, relative to the project root."""
    checkpoints: tuple[CheckpointMeta, ...]


class BundleManifest(Record):
    """``MANIFEST.json`` at a release bundle's root: every file with size and sha256."""

    schema_version: Literal[1] = 1
    name: str
    created: str
    """UTC ISO-8601 time the bundle was built."""
    files: tuple[FileEntry, ...]
    """Every file of the bundle except MANIFEST.json (and signatures/)."""
    bundle_digest: str
    """sha256_tree over ``files``."""


class AllowedSecretRule(Record):
    """One ``release.allowed_secrets`` rule: a bundle path glob and why it holds no secret."""

    path: str
    reason: str


class AllowedSecretFinding(Record):
    """A secret-like match the bundle carries on purpose, and what allowed it."""

    path: str
    line: int
    what: str
    allowed_by: str


class AllowedSecrets(Record):
    """``allowed_secrets.json``: the rules a bundle was built with and every match they allow."""

    schema_version: Literal[1] = 1
    rules: tuple[AllowedSecretRule, ...] = ()
    allowed: tuple[AllowedSecretFinding, ...] = ()


class HubBranches(Record):
    """``branches.json``: the Hub branch publish gives each checkpoint of the bundle."""

    schema_version: Literal[1] = 1
    template: str
    """The ``release.branch_name`` it was made with."""
    branches: dict[str, str]
    """``checkpoints/<stage>/step-N`` -> branch name."""


class TokenizerProbe(Record):
    """A fixed text and the token ids the tokenizer gave it; verify re-encodes and compares."""

    schema_version: Literal[1] = 1
    text: str
    ids: tuple[int, ...]


class ShardEntry(Record):
    """One packed pretraining shard (a .npy int32 array [num_seqs, seq_len])."""

    path: str
    sha256: str
    size: int
    num_seqs: int
    num_tokens: int


class DatasetEntry(Record):
    """One record file (JSONL) of a stage's dataset or of an eval set."""

    path: str
    sha256: str
    size: int
    num_records: int


class SourceEntry(Record):
    """One input source: the synthetic generator (with its seed) or a user import."""

    name: str
    kind: str
    path: str | None
    sha256: str
    num_records: int
    license: str | None = None
    """The source's license tag (Hub datasets: the params or the dataset card), when known."""
    pinned: PinnedSource | None = None
    """Hub datasets: the repo, commit and every file read, with digests."""


class DataManifest(Record):
    """``manifest.json`` of the data stage: every output with its digest."""

    schema_version: Literal[1] = 1
    seed: int
    seq_len: int
    vocab_size: int
    tokenizer_dir: str
    tokenizer_sha256: str
    """sha256_tree of the tokenizer folder."""
    tokenizer_files: tuple[FileEntry, ...]
    tokenizer_source: PinnedSource | None = None
    """Where the tokenizer came from (``data.tokenizer.from``); null: trained BPE."""
    shards: tuple[ShardEntry, ...]
    datasets: dict[str, DatasetEntry]
    """Per role: pretrain_docs, sft, dpo, distill, grpo, eval_text, eval_problems, eval_dpo."""
    sources: tuple[SourceEntry, ...]
    num_pretrain_seqs: int
    num_pretrain_tokens: int
    order_algorithm: str = "permutation-v0"
    """The data order algorithm the trainer must use (openrelease.data.order); manifests from
    before it was recorded used a materialised numpy permutation per epoch."""
    data_digest: str
    """Digest over everything above: the identity of this data, keying the data order."""


class GitInfo(Record):
    """The code version: commit, whether the tree was dirty, and the diff's digest."""

    commit: str | None
    dirty: bool
    """Uncommitted changes besides dvc.lock (DVC's own bookkeeping) and, in a `dvc exp run`,
    the params the experiment set."""
    diff_sha256: str | None
    experiment: str | None = None
    """The `dvc exp run` experiment this run belongs to (its name), if any."""
    overrides: dict[str, str] = {}
    """Params (``a.b.c`` keys) the experiment changed from the commit, with their new values."""


class InputRecord(Record):
    """A data input of a stage (data manifest, tokenizer, parent checkpoint, traces)."""

    name: str
    kind: str
    path: str
    digest: str


class StageRecord(Record):
    """``record.json`` beside a stage's outputs: everything MLflow holds, without MLflow."""

    schema_version: Literal[1] = 1
    stage: str
    pipeline_key: str
    run_key: str
    run_id: str | None
    parent_run_id: str | None
    tracking_uri: str
    params: dict[str, Any]
    params_digest: str
    seed: int
    git: GitInfo
    environment: dict[str, str]
    fingerprint: dict[str, str] = {}
    """Hardware and kernel fingerprint (openrelease.record.fingerprint); empty in old records."""
    inputs: tuple[InputRecord, ...]
    checkpoints: tuple[CheckpointMeta, ...]
    final_metrics: dict[str, float]
    started: str
    finished: str | None
    status: str


class HarnessTaskResult(Record):
    """One lm-evaluation-harness task (or group) scored on one checkpoint."""

    scores: dict[str, float]
    """lm-eval's own keys, ``<metric>,<filter>`` (e.g. ``acc,none``, ``acc_stderr,none``)."""
    config_hash: str | None
    """sha256 of the task's resolved config as lm-eval reports it; None for a group."""
    prompt: dict[str, str]
    """The prompt template: description, doc_to_text, doc_to_choice, doc_to_target, delimiters."""
    output_type: str | None
    """multiple_choice, generate_until, loglikelihood, ...; None for a group."""
    num_fewshot: int | None
    """Few-shot examples each prompt had (lm-eval's n-shot)."""
    num_samples: int | None
    """Documents scored (after the limit)."""
    task_version: str | None
    """The task's own ``metadata.version``."""
    dataset: str | None
    """``dataset_path`` (a Hub dataset id, or a builder such as json for local files)."""
    dataset_name: str | None
    """``dataset_name``: the dataset config."""
    split: str | None
    """The split scored (test_split, else validation_split)."""


class HarnessRecord(Record):
    """lm-evaluation-harness scores of one checkpoint and what makes them comparable."""

    harness_version: str
    """lm-eval's package version."""
    seed: int
    """Seed of lm-eval's python, numpy, torch RNGs and of the few-shot sampler."""
    limit: int | None
    """Documents per task requested (None: all)."""
    num_fewshot: int | None
    """n-shot requested (None: each task's default)."""
    batch_size: int
    tasks: dict[str, HarnessTaskResult]
    """Task or group name -> its result."""


class EvalResult(Record):
    """``artifacts/eval/results/<stage>/step-<N>.json``: one checkpoint's metrics."""

    schema_version: Literal[1] = 1
    stage: str
    step: int
    tokens_seen: int
    checkpoint: str
    checkpoint_digest: str
    eval_digest: str
    """Digest of the eval params and eval data: a change re-evaluates."""
    metrics: dict[str, float]
    lm_eval: HarnessRecord | None = None
    """lm-evaluation-harness results, when ``eval.lm_eval`` chose this checkpoint."""


class StageReplay(Record):
    """A replayed stretch of a stage: its state at ``from_step`` -> its checkpoint ``to_step``."""

    stage: str
    from_step: int
    """0: from the stage's initial weights (no training state needed)."""
    to_step: int
    identical: bool
    """Every file of the replayed checkpoint has the recorded sha256."""
    recorded_digest: str
    """``checkpoint_digest`` of the recorded checkpoint at ``to_step``."""
    replayed_digest: str
    weights_sha256: str
    """sha256 of the recorded model.safetensors (as its meta.json lists it)."""
    replayed_weights_sha256: str
    max_abs_delta: float | None
    """Largest |replayed - recorded| over every weight; 0.0 when identical, None when some
    tensor could not be compared (another shape or dtype, missing)."""
    max_loss_delta: float | None
    """Largest |replayed - recorded| training loss over the replayed steps."""
    world_size: int
    """Processes of the recorded run."""
    device: str
    """Device of the recorded run (``cpu (x86_64)``, ``cuda (NVIDIA H100 80GB HBM3)``)."""
    replay_world_size: int
    replay_device: str
    seconds: float


class ReproCertificate(Record):
    """``certificate.json``: short replays of each stage, made when the release was bundled."""

    schema_version: Literal[1] = 1
    created: str
    """UTC ISO-8601 time the replays finished."""
    openrelease_version: str
    guarantee: str
    """What identity means: bitwise on the same world size and hardware class."""
    replays: tuple[StageReplay, ...]
