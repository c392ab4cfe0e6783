"""params.yaml as frozen pydantic models: the only source of hyperparameters.

`load_params` reads a file and turns any problem into a one-line `ParamsError` that names the
YAML path, the bad value and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from openrelease.errors import ParamsError
from openrelease.safeio import read_regular

StageName = str
"""A training stage's name: an entry of params ``stages`` (``pretrain``, ``sft2``, ...)."""
StageKind = Literal["pretrain", "sft", "dpo", "distill", "grpo"]
"""What a training stage does; its name's params section is validated by the kind's model."""
STAGE_KINDS: tuple[StageKind, ...] = ("pretrain", "sft", "dpo", "distill", "grpo")
STAGES: tuple[StageName, ...] = ("pretrain", "sft", "distill", "grpo")
"""The default stage list (params without ``stages``): pretrain -> sft -> distill -> grpo."""
SCRATCH = "scratch"
"""``from: scratch``: random initialisation from the seed."""
HF_PREFIX = "hf:"
"""``from: hf:ORG/NAME@REVISION``: a base model on the Hugging Face Hub."""
RESERVED_NAMES = frozenset(
    {"seed", "data", "model", "compute", "eval", "release", "stages", "bundle", "audit", SCRATCH}
)
"""Names a training stage cannot take: params sections and the other pipeline stages."""
MAX_PARAMS_BYTES = 1 << 20


class Params(BaseModel):
    """Strict, immutable, self-documenting base for everything read from params.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    ADDED_LATER: ClassVar[frozenset[str]] = frozenset()
    """Fields added after releases were recorded: left out of `digest_dump` at their default,
    so a run recorded before a field existed keeps its params digest (and still replays)."""

    def digest_dump(self) -> dict[str, Any]:
        """The JSON form a params digest is taken of (`ADDED_LATER` fields at default left out)."""
        dumped = self.model_dump(mode="json")
        for name in self.ADDED_LATER:
            if getattr(self, name) == type(self).model_fields[name].default:
                del dumped[name]
        return dumped


def _inside_project(path: str) -> str:
    """A path relative to the project root that cannot climb out of it (no ``/x``, no ``..``)."""
    parts = path.replace("\\", "/").split("/")
    if not path.strip() or "\x00" in path:
        raise ValueError("must be a non-empty path without NUL bytes")
    if path.startswith(("/", "\\", "~")) or (len(path) > 1 and path[1] == ":"):
        raise ValueError("must be relative to the project root, not absolute")
    if ".." in parts:
        raise ValueError("must stay inside the project (no '..')")
    return path


ProjectPath = Annotated[str, AfterValidator(_inside_project)]
"""A file or folder path relative to the project root, kept inside the project."""

_HUB_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


def _hub_or_folder(spec: str) -> str:
    """``hf:ORG/NAME@REVISION`` (a Hub repo at a revision) or a project-relative folder."""
    if not spec.startswith("hf:"):
        return _inside_project(spec)
    repo, sep, revision = spec[3:].partition("@")
    if not _HUB_REPO.fullmatch(repo) or not sep or not revision.strip():
        raise ValueError("must be hf:ORG/NAME@REVISION (a commit sha) or a folder in the project")
    return spec


HubOrFolder = Annotated[str, AfterValidator(_hub_or_folder)]
"""``hf:ORG/NAME@REVISION`` or a folder path relative to the project root."""


def check_pinned(spec: str | None, *, allow_floating: bool, key: str) -> None:
    """Refuse a Hub revision that is a branch or tag (it can move) unless ``allow_floating``."""
    if spec is None or not spec.startswith("hf:") or allow_floating:
        return
    revision = spec.partition("@")[2]
    if not _COMMIT_SHA.fullmatch(revision):
        raise ValueError(
            f"{key} revision {revision!r} is a branch or tag, which can move; pin its 40-hex "
            "commit sha, or set allow_floating_revision: true to record the commit it resolves to"
        )


# --------------------------------------------------------------------------- data


class SyntheticParams(Params):
    """Size of the deterministic synthetic corpus (prose plus arithmetic problems)."""

    num_stories: int = Field(ge=0, le=10_000_000)
    """Prose documents generated from the seeded grammar for pretraining."""
    num_problems: int = Field(ge=0, le=10_000_000)
    """Arithmetic/word problems with verifiable answers (split across sft/distill/grpo/eval)."""
    max_operand: int = Field(default=99, ge=2, le=1_000_000)
    """Largest operand in generated arithmetic problems."""


DataFormat = Literal["jsonl", "text", "parquet", "hf_datasets", "hub"]
DataRole = Literal["pretrain", "sft", "dpo", "distill", "grpo"]


class ImportParams(Params):
    """One user data source, hashed on the way in.

    Roles and the fields they need: pretrain -> ``text``; sft -> ``prompt``, ``response``;
    dpo -> ``prompt``, ``chosen``, ``rejected``; distill -> ``prompt``, ``reasoning``,
    ``answer``; grpo -> ``prompt``, ``answer``.
    """

    format: DataFormat
    """File format: jsonl, text (one document per blank-line-separated block), parquet, a
    local Hugging Face ``datasets`` folder written by ``save_to_disk``, or ``hub``: a dataset
    repo on the Hugging Face Hub (its Parquet files) pinned to a commit."""
    path: ProjectPath | None = None
    """Path to the file or folder, relative to the project root (every format but hub)."""
    role: DataRole
    """Which stage's dataset the records join."""
    text_field: str = "text"
    """Column holding the document text (role pretrain, formats jsonl/parquet/hf_datasets/hub)."""
    repo: str | None = Field(default=None, pattern=_HUB_REPO.pattern)
    """format hub: the dataset repo, ORG/NAME."""
    revision: str | None = None
    """format hub: the commit sha to read (a branch or tag needs allow_floating_revision)."""
    allow_floating_revision: bool = False
    """format hub: accept a branch or tag and record the commit it resolves to."""
    config: str | None = None
    """format hub: the dataset config (subset), the top folder of its Parquet files."""
    split: str | None = None
    """format hub: the split (train, test, ...): Parquet files named or foldered by it."""
    data_files: tuple[str, ...] = ()
    """format hub: glob patterns of the repo files to read (default: by config and split)."""
    fields: dict[str, str] = Field(default_factory=dict)
    """Record field -> source column, e.g. {prompt: question, answer: final} (default: the
    field names themselves; text_field for pretrain text)."""
    license: str | None = None
    """SPDX license tag of this source (format hub: default the dataset card's license)."""

    @model_validator(mode="after")
    def _check_source(self) -> ImportParams:
        if self.format == "hub":
            if self.repo is None or self.revision is None:
                raise ValueError("format hub needs repo (ORG/NAME) and revision (a commit sha)")
            if self.path is not None:
                raise ValueError("format hub reads repo and revision, not path")
            check_pinned(
                f"hf:{self.repo}@{self.revision}",
                allow_floating=self.allow_floating_revision,
                key=f"hf:{self.repo}",
            )
        elif self.path is None:
            raise ValueError(f"format {self.format} needs a path")
        return self

    @property
    def name(self) -> str:
        """How records and manifests name this source: its path, or hf:ORG/NAME[/config][:split]."""
        if self.format != "hub":
            return str(self.path)
        config = f"/{self.config}" if self.config else ""
        split = f":{self.split}" if self.split else ""
        return f"hf:{self.repo}{config}{split}"


class TokenizerParams(Params):
    """Which tokenizer the data stage uses: a trained byte-level BPE, or an existing one."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        populate_by_name=True,
        serialize_by_alias=True,
    )
    from_: HubOrFolder | None = Field(default=None, alias="from")
    """``hf:ORG/NAME@REVISION`` or a local tokenizer folder (with tokenizer.json); null trains
    the byte-level BPE (``data.vocab_size``)."""
    allow_floating_revision: bool = False
    """Accept a branch or tag in ``from`` and record the commit it resolves to."""

    @model_validator(mode="after")
    def _check_pin(self) -> TokenizerParams:
        check_pinned(self.from_, allow_floating=self.allow_floating_revision, key="from")
        return self


class DataParams(Params):
    """The data stage: corpus, importers, tokenizer and packing."""

    synthetic: SyntheticParams
    """Size of the generated corpus; set both counts to 0 to use only imports."""
    imports: tuple[ImportParams, ...] = ()
    """User data sources added to the generated corpus."""
    tokenizer: TokenizerParams = TokenizerParams()
    """The tokenizer: trained here (default) or taken from the Hub or a folder."""
    vocab_size: int = Field(ge=300, le=262_144)
    """Byte-level BPE vocabulary size (256 byte symbols plus merges and special tokens)."""
    seq_len: int = Field(ge=16, le=131_072)
    """Tokens per packed pretraining sequence."""
    seqs_per_shard: int = Field(default=1024, ge=1)
    """Packed sequences per shard file."""
    num_proc: int = Field(default=1, ge=1, le=1024)
    """Processes that tokenise the pretraining documents (the output is the same for any)."""
    eval_fraction: float = Field(default=0.05, gt=0.0, lt=0.5)
    """Share of documents and problems held out for evaluation (never trained on)."""
    out_dir: ProjectPath = "artifacts/data"
    """Where the data stage writes its outputs, relative to the project root."""


# --------------------------------------------------------------------------- model


class ModelParams(Params):
    """Architecture of the transformers causal LM (Llama, Mistral or Qwen2 flavour)."""

    arch: Literal["llama", "mistral", "qwen2"] = "llama"
    """transformers model family: LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM."""
    hidden_size: int = Field(ge=8)
    """Width of the residual stream."""
    num_layers: int = Field(ge=1)
    """Decoder layers."""
    num_heads: int = Field(ge=1)
    """Attention heads."""
    num_kv_heads: int = Field(ge=1)
    """Key/value heads (grouped-query attention when fewer than num_heads)."""
    intermediate_size: int = Field(ge=8)
    """Width of the MLP."""
    max_position_embeddings: int = Field(ge=16)
    """Longest sequence the model supports."""
    rope_theta: float = Field(default=10_000.0, gt=0)
    """RoPE base frequency."""
    rms_norm_eps: float = Field(default=1e-5, gt=0)
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share input and output embeddings."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Attention dropout."""
    sliding_window: int | None = Field(default=None, ge=16)
    """Sliding-window attention span (mistral only); null for full attention."""
    init_std: float = Field(default=0.02, gt=0)
    """Standard deviation of the initial weights."""

    @model_validator(mode="after")
    def _check_heads(self) -> ModelParams:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} must be divisible by num_kv_heads {self.num_kv_heads}"
            )
        if self.sliding_window is not None and self.arch != "mistral":
            raise ValueError("sliding_window is only supported with arch: mistral")
        return self


# --------------------------------------------------------------------------- compute


class ComputeParams(Params):
    """How training processes are launched and what numerics they use."""

    launcher: Literal["python", "torchrun", "srun"] = "torchrun"
    """How `dvc repro` starts a training stage; see README "Multi-node"."""
    nproc_per_node: int = Field(default=1, ge=1, le=1024)
    """Processes per node (one per GPU; on CPU, processes sharing the cores)."""
    nnodes: int = Field(default=1, ge=1, le=100_000)
    """Nodes in the job; above 1, rdzv_endpoint must be set."""
    rdzv_endpoint: str | None = None
    """host:port of the torchrun rendezvous for multi-node runs."""
    num_threads: int = Field(default=1, ge=1, le=1024)
    """torch intra-op threads per process; part of the numerical recipe (changes bits)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """cuda when available under auto; the backend follows (nccl on cuda, gloo on cpu)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 parameters with fp32 reduction on GPU under auto, fp32 on CPU."""
    activation_checkpointing: bool = False
    """Recompute decoder-layer activations in the backward pass to save memory."""
    compile: bool = False
    """torch.compile each decoder layer."""
    deterministic: bool | Literal["portable"] = "portable"
    """``portable`` (default): deterministic kernels with CPU code paths every x86-64 CPU runs
    alike, pinned before torch starts (ATen AVX2, MKL COMPATIBLE, oneDNN AVX2; train/launch.py),
    so any x86-64 CPU of the last decade, Intel or AMD, gives the same bits; ``true``:
    deterministic kernels, same bits on the same hardware only; ``false``: fastest kernels,
    not reproducible. On CUDA, portable and true both mean deterministic algorithms and a
    fixed cuBLAS workspace (GPU kernels differ between GPU models)."""

    @property
    def determinism(self) -> Literal["portable", "true", "false"]:
        """``deterministic`` as one word: ``portable``, ``true`` or ``false``."""
        if self.deterministic == "portable":
            return "portable"
        return "true" if self.deterministic else "false"

    @model_validator(mode="after")
    def _check_multinode(self) -> ComputeParams:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port of the rendezvous)")
        if self.launcher == "python" and self.nproc_per_node * self.nnodes != 1:
            raise ValueError("launcher python runs one process; use torchrun for more")
        return self


# --------------------------------------------------------------------------- training


class TrainStageParams(Params):
    """Optimisation settings shared by every training stage."""

    num_steps: int = Field(ge=1)
    """Optimizer steps to run."""
    global_batch_size: int = Field(ge=1)
    """Samples per optimizer step across all ranks (micro-batches times accumulation)."""
    micro_batch_size: int = Field(ge=1)
    """Samples per forward pass on one rank."""
    seq_len: int = Field(ge=8)
    """Longest training sequence in tokens (pretrain uses the data stage's packed length)."""
    lr: float = Field(gt=0, le=1.0)
    """Peak learning rate."""
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warm-up steps."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Decay after warm-up: cosine, warmup-stable-decay, or constant."""
    decay_fraction: float = Field(default=0.2, gt=0.0, le=1.0)
    """wsd only: share of the steps spent in the final linear decay."""
    weight_decay: float = Field(default=0.1, ge=0.0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = Field(default=1.0, ge=0.0)
    """Clip the global gradient norm to this value; 0 disables."""
    checkpoint_every: int = Field(ge=1)
    """Write a release checkpoint (HF folder + meta.json) every this many steps and at the end."""
    state_every: int = Field(default=0, ge=0)
    """Write a resumable training state every this many steps (0: with each checkpoint)."""
    keep_last_states: int = Field(default=2, ge=1)
    """Resumable training states kept on disk (older ones are deleted)."""
    allow_floating_revision: bool = False
    """Accept a branch or tag in the stage's ``from: hf:ORG/NAME@REVISION`` and record the
    commit it resolves to (by default only a 40-hex commit sha is accepted)."""

    @model_validator(mode="after")
    def _check_batch(self) -> TrainStageParams:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} must be a multiple of "
                f"micro_batch_size {self.micro_batch_size}"
            )
        if self.warmup_steps >= self.num_steps:
            raise ValueError(
                f"warmup_steps {self.warmup_steps} must be below num_steps {self.num_steps}"
            )
        return self


class PretrainParams(TrainStageParams):
    """Next-token prediction on packed sequences, from random initialisation."""


class SFTParams(TrainStageParams):
    """Instruction tuning on chat pairs; loss on assistant tokens only."""


class TeacherParams(Params):
    """Where distillation traces come from."""

    kind: Literal["data", "trace_file", "model"] = "data"
    """data: the data stage's step-by-step solutions; trace_file: a JSONL of prompt/reasoning/
    answer; model: generate with a local transformers model folder."""
    path: str | None = None
    """The trace file or the teacher model folder (kinds trace_file and model)."""
    revision: str | None = None
    """The teacher's revision (e.g. a Hub commit), recorded for provenance when known."""
    temperature: float = Field(default=0.7, ge=0.0)
    """Sampling temperature (kind model)."""
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    """Nucleus sampling threshold (kind model)."""
    samples_per_prompt: int = Field(default=1, ge=1)
    """Traces sampled per prompt (kind model)."""
    max_new_tokens: int = Field(default=128, ge=1)
    """Longest generated trace (kind model)."""
    reject_incorrect: bool = True
    """Drop generated traces whose answer fails the task's verifier (kind model)."""

    @model_validator(mode="after")
    def _check_path(self) -> TeacherParams:
        if self.kind != "data" and not self.path:
            raise ValueError(f"teacher kind {self.kind} needs a path")
        return self


class DistillParams(TrainStageParams):
    """SFT on teacher chain-of-thought traces, from the dpo stage's final checkpoint."""

    teacher: TeacherParams = TeacherParams()
    """The source of the reasoning traces."""


class DPOParams(TrainStageParams):
    """Direct preference optimisation on (prompt, chosen, rejected) pairs.

    global_batch_size and micro_batch_size count pairs (each pair is two sequences).
    """

    beta: float = Field(default=0.1, gt=0.0)
    """Strength of the implicit KL to the reference (the temperature of the implicit reward)."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: the DPO loss -log sigmoid(beta x margin); ipo: (margin - 1 / (2 beta))^2 on
    length-averaged log-probs."""
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    """sigmoid only: assumed share of flipped preference labels (conservative DPO)."""
    reference: StageName | None = None
    """Stage whose final checkpoint is the frozen reference; null: the policy's starting weights
    (the stage dpo starts from)."""

    @model_validator(mode="after")
    def _check_dpo(self) -> DPOParams:
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("label_smoothing applies to loss_type sigmoid only")
        return self  # reference names an earlier stage: PipelineParams checks the graph


RewardName = Literal["correctness", "format", "length"]


def _default_rewards() -> dict[RewardName, float]:
    return {"correctness": 1.0, "format": 0.2}


class GRPOParams(TrainStageParams):
    """Group-relative policy optimisation with verifiable rewards, from the distill checkpoint.

    global_batch_size counts prompts per step; each prompt gets group_size rollouts.
    """

    group_size: int = Field(ge=2)
    """Rollouts sampled per prompt; advantages are normalised within each group."""
    max_new_tokens: int = Field(ge=1)
    """Tokens generated per rollout (fixed length so sharded ranks stay in step)."""
    temperature: float = Field(default=1.0, gt=0.0)
    """Rollout sampling temperature."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Rollout nucleus sampling threshold."""
    clip_eps: float = Field(default=0.2, gt=0.0)
    """PPO-style clip range of the policy ratio."""
    kl_coef: float = Field(default=0.04, ge=0.0)
    """Weight of the k3 KL estimate to the frozen reference (the distill checkpoint)."""
    rewards: dict[RewardName, float] = Field(default_factory=_default_rewards)
    """Verifier weights; the reward is their weighted sum."""
    ppo_epochs: int = Field(default=1, ge=1)
    """Policy updates per batch of rollouts."""
    ADDED_LATER: ClassVar[frozenset[str]] = frozenset({"scale_rewards"})

    scale_rewards: Literal["group", "none"] = "group"
    """Advantages: (reward - group mean) / group std ("group", GRPO as published; TRL's
    default), or reward - group mean unscaled ("none", Dr. GRPO: a group that is nearly all
    right or all wrong no longer gets full-size advantages)."""


# --------------------------------------------------------------------------- stage graph

KIND_PARAMS: dict[StageKind, type[TrainStageParams]] = {
    "pretrain": PretrainParams,
    "sft": SFTParams,
    "dpo": DPOParams,
    "distill": DistillParams,
    "grpo": GRPOParams,
}
"""The params model that validates a stage's section, by the stage's kind."""

_HF_REF = re.compile(
    r"^hf:[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*@[A-Za-z0-9][A-Za-z0-9._/-]*$"
)
InitKind = Literal["scratch", "stage", "hf", "folder"]


def init_kind(value: str) -> InitKind:
    """What a ``from`` value names: scratch, an earlier stage, a Hub base model or a folder."""
    if value == SCRATCH:
        return "scratch"
    if value.startswith(HF_PREFIX):
        return "hf"
    if "/" in value or value.startswith((".", "~")):
        return "folder"
    return "stage"


class StageSpec(Params):
    """One training stage of the pipeline: its name, what it does and what it starts from."""

    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    """The stage's name: its params section, its DVC stage and ``artifacts/<name>``."""
    kind: StageKind
    """pretrain, sft, dpo, distill or grpo: the batch source and objective."""
    from_: str = Field(alias="from", min_length=1, max_length=512)
    """An earlier stage's name (its final checkpoint), ``scratch``, a Hub base model
    ``hf:ORG/NAME@REVISION`` or a local model folder (``./models/base``). Default: the previous
    stage, or ``scratch`` for a first stage of kind pretrain."""

    @model_validator(mode="after")
    def _check(self) -> StageSpec:
        if self.name in RESERVED_NAMES:
            raise ValueError(f"stage name {self.name!r} is reserved; choose another name")
        if self.name in STAGE_KINDS and self.name != self.kind:
            raise ValueError(
                f"stage {self.name!r} has kind {self.kind}: a stage named after a kind must be of "
                f"that kind; rename it (e.g. {self.kind}_{self.name})"
            )
        if init_kind(self.from_) == "hf" and not _HF_REF.match(self.from_):
            raise ValueError(
                f"from {self.from_!r} is not a Hub base model reference; write "
                "hf:ORG/NAME@REVISION (a pinned revision)"
            )
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        data["from"] = data.pop("from_")
        return data


DEFAULT_STAGE_LIST: tuple[dict[str, str], ...] = (
    {"name": "pretrain", "kind": "pretrain", "from": SCRATCH},
    {"name": "sft", "kind": "sft", "from": "pretrain"},
    {"name": "distill", "kind": "distill", "from": "sft"},
    {"name": "grpo", "kind": "grpo", "from": "distill"},
)
"""``stages`` when params leave it out: today's chain, so older params files keep working."""


def _fill_stage_defaults(raw: Any) -> Any:
    """Give each stage entry without ``from`` its default (previous stage, or scratch)."""
    if not isinstance(raw, list):
        return raw
    filled: list[Any] = []
    for i, entry in enumerate(raw):
        if isinstance(entry, dict) and "from" not in entry and "from_" not in entry:
            prev = raw[i - 1].get("name") if i and isinstance(raw[i - 1], dict) else None
            default = prev if prev is not None else SCRATCH
            entry = {**entry, "from": default}
        filled.append(entry)
    return filled


# --------------------------------------------------------------------------- eval, release


class LmEvalParams(Params):
    """lm-evaluation-harness benchmarks, run through its Python API on chosen checkpoints.

    Each score is recorded with the harness version, the task's config hash, its prompt
    template, n-shot, seed and limit (README "Benchmarks with lm-evaluation-harness").
    """

    tasks: tuple[str, ...] = ()
    """Task or group names: any lm-eval knows (arc_easy, hellaswag, ...; downloaded by
    ``datasets``), the package's own openrelease_arith_mc and openrelease_arith_gen, or tasks
    defined by YAML under include_path. Empty: lm-eval is not run."""
    include_path: ProjectPath | None = None
    """A folder of task YAMLs (searched recursively). Local ``data_files`` in them are
    relative to the project root, where the eval stage runs."""
    num_fewshot: int | None = Field(default=None, ge=0)
    """Few-shot examples per prompt; null: each task's own default."""
    limit: int | None = Field(default=None, ge=1)
    """Score only the first N documents of each task; null: all of them."""
    batch_size: int = Field(default=8, ge=1)
    """Requests per forward pass."""
    checkpoints: Literal["all", "every_k", "finals"] = "finals"
    """Which checkpoints are scored: every one, every k-th of each stage (plus its final), or
    the final checkpoint of each stage."""
    every_k: int = Field(default=2, ge=1)
    """k for checkpoints: every_k (the 1st checkpoint of a stage counts as the 1st)."""
    seed: int = Field(default=1234, ge=0)
    """Seed of lm-eval's python, numpy and torch RNGs and of its few-shot sampler."""


class EvalParams(Params):
    """The eval stage: which tasks, how much, how to generate."""

    tasks: tuple[str, ...] = ("heldout_loss", "arithmetic", "preference")
    """Built-in task names (heldout_loss, arithmetic, preference: the share of held-out
    preference pairs whose chosen response gets the higher log-prob), or paths to JSONL files
    of {prompt, answer}."""
    max_examples: int = Field(default=64, ge=1)
    """Examples per generative task."""
    max_new_tokens: int = Field(default=48, ge=1)
    """Greedy generation budget per answer."""
    num_samples: int = Field(default=8, ge=0)
    """Sample outputs saved per stage's final checkpoint."""
    lm_eval: LmEvalParams = LmEvalParams()
    """Benchmarks scored by lm-evaluation-harness."""


class LicenseParams(Params):
    """SPDX license ids per MOF content type."""

    code: str = "Apache-2.0"
    """License of training, inference and evaluation code."""
    data: str = "CDLA-Permissive-2.0"
    """License of datasets and data cards."""
    documentation: str = "CC-BY-4.0"
    """License of model card, technical report and other documentation."""
    weights: str = "Apache-2.0"
    """License of model parameters (final and intermediate)."""
    allow_nonopen: bool = False
    """Set true to release under licenses MOF does not consider open (the audit scores them)."""


class RetentionParams(Params):
    """Which resumable training states a release carries."""

    state_every_k: int = Field(default=0, ge=0)
    """Keep every k-th training state of each stage (0: none besides the last)."""
    keep_last: bool = True
    """Keep the last training state of each stage."""


class AllowedSecretParams(Params):
    """A file whose secret-like content is known not to be a secret (a test fixture)."""

    path: str = Field(min_length=1)
    """Bundle path or glob (``code/tests/fixtures/*.pem``) the rule covers."""
    reason: str = Field(min_length=3)
    """Why the matches are not secrets; shown in the publish plan and recorded in the bundle."""


DEFAULT_BRANCH_NAME = "{stage}-step{step}-tokens{tokens}"


class ReleaseParams(Params):
    """The release bundle: names, licenses, what to include."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
    """Model name; also the Hub repo name."""
    organization: str = "openrelease"
    """Producer shown in the model card and mof.yaml."""
    licenses: LicenseParams = LicenseParams()
    """Licenses per content type."""
    include_data: bool = True
    """Copy the data into the bundle (true) or ship pointers with sha256 (false)."""
    include_base_model: bool = False
    """Copy the files of the base model the chain started from (a stage's ``from: hf:...`` or
    folder) into the bundle's ``base_model/``. Only for a base model whose license MOF counts
    as open (Apache-2.0, MIT, ...): anything else is refused. False: by reference only (repo,
    commit and every file's sha256, in the records and the model card)."""
    paper: str | None = None
    """Path or URL of a research paper to include."""
    retention: RetentionParams = RetentionParams()
    """Resumable training states to include."""
    allowed_secrets: tuple[AllowedSecretParams, ...] = ()
    """Files allowed to hold secret-like text (besides lines marked ``pragma: allowlist
    secret``); every match they allow is listed in the bundle and the publish plan."""
    branch_name: str = Field(default=DEFAULT_BRANCH_NAME, pattern=r"^[A-Za-z0-9._{}-]+$")
    """Hub branch of each intermediate checkpoint; ``{stage}``, ``{step}`` and ``{tokens}``
    (tokens seen, 12M / 1.5B / 830K style, exact below 1000; ``{tokens_exact}`` for the exact
    count) are filled in. Must contain ``{stage}`` and ``{step}``."""

    @model_validator(mode="after")
    def _check_branch_name(self) -> ReleaseParams:
        fields = set(re.findall(r"{([^{}]*)}", self.branch_name))
        if not {"stage", "step"} <= fields or fields - {"stage", "step", "tokens", "tokens_exact"}:
            raise ValueError(
                f"branch_name {self.branch_name!r} must use {{stage}} and {{step}} and only "
                "{stage}, {step}, {tokens} and {tokens_exact}"
            )
        return self


# --------------------------------------------------------------------------- root


class PipelineParams(Params):
    """The whole params.yaml: one section per pipeline step, one per training stage.

    ``stages`` is the ordered list of training stages; each stage's settings are the section
    named after it (validated by its kind's model), so two sft stages ``sft`` and ``sft2`` have
    two sections. A section no stage names is refused.
    """

    model_config = ConfigDict(extra="allow")
    seed: int = Field(ge=0, lt=2**63)
    """Root seed; every random stream derives from it."""
    data: DataParams
    """The data stage."""
    model: ModelParams
    """The model architecture."""
    compute: ComputeParams = ComputeParams()
    """Launch and numerics."""
    stages: tuple[StageSpec, ...] = Field(
        default=tuple(StageSpec.model_validate(s) for s in DEFAULT_STAGE_LIST), min_length=1
    )
    """The training stages in order: ``{name, kind, from}`` each (see StageSpec)."""
    pretrain: PretrainParams | None = None
    """Pretraining (the section of a stage named pretrain)."""
    sft: SFTParams | None = None
    """Instruction tuning (the section of a stage named sft)."""
    dpo: DPOParams | None = None
    """Preference optimisation, DPO or IPO (the section of a stage named dpo)."""
    distill: DistillParams | None = None
    """Chain-of-thought distillation (the section of a stage named distill)."""
    grpo: GRPOParams | None = None
    """GRPO reinforcement learning (the section of a stage named grpo)."""
    eval: EvalParams = EvalParams()
    """Evaluation."""
    release: ReleaseParams
    """The release bundle."""

    _sections: dict[str, TrainStageParams] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and "stages" in data:
            data = {**data, "stages": _fill_stage_defaults(data["stages"])}
        return data

    @model_validator(mode="after")
    def _check_graph(self) -> PipelineParams:
        seen: list[str] = []
        for spec in self.stages:
            if spec.name in seen:
                raise ValueError(f"stages: {spec.name!r} is listed twice; names must be unique")
            if init_kind(spec.from_) == "stage" and spec.from_ not in seen:
                raise ValueError(
                    f"stages: {spec.name} starts from {spec.from_!r}, which is not an earlier "
                    f"stage; use one of {seen or '(none yet)'}, scratch, hf:ORG/NAME@REVISION "
                    "or a folder path like ./models/base"
                )
            if spec.from_ == SCRATCH and spec.kind in ("dpo", "distill", "grpo"):
                raise ValueError(
                    f"stages: {spec.name} (kind {spec.kind}) cannot start from scratch; "
                    "it needs a model to start from (an earlier stage or a base model)"
                )
            seen.append(spec.name)
        extra = dict(self.model_extra or {})
        sections: dict[str, TrainStageParams] = {}
        for spec in self.stages:
            if spec.name in type(self).model_fields:
                section = getattr(self, spec.name)
                if section is None:
                    raise ValueError(f"{spec.name}: required key is missing (stage {spec.name})")
                sections[spec.name] = section
                continue
            raw = extra.pop(spec.name, None)
            if raw is None:
                raise ValueError(f"{spec.name}: required key is missing (stage {spec.name})")
            try:
                sections[spec.name] = KIND_PARAMS[spec.kind].model_validate(raw)
            except ValidationError as exc:
                errors = exc.errors()
                first = _describe_error(errors[0], errors, prefix=f"{spec.name}.")
                raise ValueError(first) from None
        for i, spec in enumerate(self.stages):
            section = sections[spec.name]
            check_pinned(
                spec.from_ if init_kind(spec.from_) == "hf" else None,
                allow_floating=section.allow_floating_revision,
                key=f"stages: {spec.name} from",
            )
            if isinstance(section, DPOParams) and section.reference is not None:
                earlier = [s.name for s in self.stages[:i]]
                if section.reference not in earlier:
                    raise ValueError(
                        f"{spec.name}.reference {section.reference!r} is not a stage that runs "
                        f"before {spec.name}; use one of {earlier or '(none yet)'}, or null for "
                        "the policy's starting weights"
                    )
        if extra:
            name = sorted(extra)[0]
            raise ValueError(
                f"{name}: unknown key (not a params section nor a stage in `stages`; "
                "see `openrelease params show`)"
            )
        self._sections = sections
        return self

    @model_validator(mode="after")
    def _check_cross(self) -> PipelineParams:
        world = self.compute.nproc_per_node * self.compute.nnodes
        for spec in self.stages:
            name, stage = spec.name, self.stage(spec.name)
            if stage.global_batch_size % (stage.micro_batch_size * world):
                raise ValueError(
                    f"{name}.global_batch_size {stage.global_batch_size} must be a multiple of "
                    f"micro_batch_size x world size = {stage.micro_batch_size} x {world}"
                )
            if stage.seq_len > self.model.max_position_embeddings:
                raise ValueError(
                    f"{name}.seq_len {stage.seq_len} exceeds model.max_position_embeddings "
                    f"{self.model.max_position_embeddings}"
                )
            if spec.kind == "pretrain" and stage.seq_len != self.data.seq_len:
                raise ValueError(
                    f"{name}.seq_len {stage.seq_len} must equal data.seq_len "
                    f"{self.data.seq_len} (pretraining reads the packed sequences)"
                )
        return self

    @model_serializer(mode="wrap")
    def _dump(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        mode = "json" if info.mode_is_json() else "python"
        for name, section in self._sections.items():
            data[name] = section.model_dump(mode=mode)
        for name in ("pretrain", "sft", "distill", "grpo"):
            if data.get(name, 0) is None:
                del data[name]
        return data

    @property
    def train_stages(self) -> tuple[StageName, ...]:
        """The training stages' names, in pipeline order."""
        return tuple(spec.name for spec in self.stages)

    def spec(self, name: StageName) -> StageSpec:
        """The ``stages`` entry of training stage ``name``."""
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise ParamsError(
            f"{name!r} is not a training stage of these params; stages: "
            f"{', '.join(self.train_stages)}."
        )

    def stage(self, name: StageName) -> TrainStageParams:
        """Return the params section of training stage ``name``."""
        # A declared section is read from its field, so model_copy(update=...) is honoured.
        field = getattr(self, name, None) if name in type(self).model_fields else None
        section = field if isinstance(field, TrainStageParams) else self._sections.get(name)
        if section is None or name not in self._sections:
            self.spec(name)  # raises naming the stages
            raise AssertionError(name)
        return section

    def parent_stage(self, name: StageName) -> StageName | None:
        """The earlier stage whose final checkpoint ``name`` starts from, or None."""
        source = self.spec(name).from_
        return source if init_kind(source) == "stage" else None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of keeping the last one."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):  # `? [a, b]`: unhashable, and no params key
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain scalar", key_node.start_mark
            )
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_unique_mapping,
)


def _reject_aliases(text: str, *, source: str) -> None:
    """Refuse YAML aliases: they can expand exponentially (the "billion laughs" bomb)."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ParamsError(
                    f"{source}: YAML aliases (*{event.anchor}) are not allowed; "
                    "write the values out in full."
                )
    except yaml.YAMLError:
        return  # a syntax error: the full parse in parse_yaml reports it with its line


def parse_yaml(text: str, *, source: str) -> Any:
    """Parse YAML safely: no Python tags, no duplicate keys, no aliases."""
    if "*" in text:
        _reject_aliases(text, source=source)
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsError(f"{where}: invalid YAML ({problem}); fix the syntax.") from None
    except RecursionError:
        raise ParamsError(f"{source}: YAML nested too deeply to read.") from None
    except ValueError as exc:  # a scalar the resolver typed but cannot build: 2025-13-45, 10**5000
        problem = str(exc).splitlines()[0].split(";")[0][:120]
        raise ParamsError(f"{source}: invalid YAML value ({problem}); quote it.") from None


def _describe_error(err: Any, errors: list[Any], *, prefix: str = "") -> str:
    loc = prefix + ".".join(str(p) for p in err["loc"]) or "<root>"
    kind = err["type"]
    if kind == "value_error" and not err["loc"]:
        # A whole-file rule (the stage graph, cross-section checks) names its own keys.
        return str(err["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        parent = err["loc"][:-1]
        missing = [
            e["loc"][-1] for e in errors if e["type"] == "missing" and e["loc"][:-1] == parent
        ]
        hint = f"did you mean {missing[0]!r}?" if missing else "see `openrelease params show`"
        return f"{loc}: unknown key ({hint})"
    if kind == "missing":
        return f"{loc}: required key is missing"
    if isinstance(err.get("input"), dict):  # a rule over a whole mapping names its keys
        return f"{loc}: {str(err['msg']).removeprefix('Value error, ')}"
    shown = repr(err.get("input"))
    if len(shown) > 60:
        shown = shown[:57] + "..."
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg} (got {shown})"


def validate_params(data: Any, *, source: str) -> PipelineParams:
    """Validate already-parsed params; errors name the YAML path, the value and the rule."""
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level.")
    try:
        return PipelineParams.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # A typo shows up as an unknown key plus a missing one: report the typo first.
        errors.sort(key=lambda e: e["type"] != "extra_forbidden")
        first = _describe_error(errors[0], errors)
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ParamsError(f"{source}: {first}{more}.", path=source) from None


def load_params(path: Path) -> PipelineParams:
    """Read and validate a params file (params.yaml or a recipe in pipelines/)."""
    if not path.exists() and not path.is_symlink():
        raise ParamsError(
            f"{path} not found; start a project with `openrelease init DIR`, or copy a recipe "
            "there: cp pipelines/tiny.yaml params.yaml",
            path=str(path),
        )
    raw = read_regular(
        path, max_bytes=MAX_PARAMS_BYTES, error=ParamsError, fix="pass the params YAML file"
    )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 (byte {exc.start}); save it as UTF-8.") from None
    return validate_params(parse_yaml(text, source=str(path)), source=str(path))
