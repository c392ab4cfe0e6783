"""What one stage run is made of: `TrainJob` and the protocols it names.

A stage hands the loop (train/loop.py) a `TrainJob`: its samples (a `BatchSource` of
`MicroBatch`es), what a step optimises (an `Objective`; token cross-entropy by default, in
train/objective.py) and where rank 0 records (a `Recorder`). Everything here is a contract; the
implementations import it, and it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from openrelease.manifest import CheckpointMeta, PinnedSource
from openrelease.params import ComputeParams, ModelParams, TrainStageParams
from openrelease.train.distributed import DistContext
from openrelease.train.model import SpecialTokens

IGNORE_INDEX = -100
"""Label of a token that carries no loss (prompt and padding tokens)."""
BatchT = TypeVar("BatchT")


@dataclass(frozen=True)
class MicroBatch:
    """One forward pass on one rank; ``labels`` align with ``input_ids`` (shifted in the loss)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) input tokens."""
        if self.attention_mask is None:
            return self.input_ids.numel()
        return int(self.attention_mask.sum())

    @property
    def num_targets(self) -> int:
        """Tokens that carry loss (after the shift)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


class BatchSource(Protocol):
    """Where a stage's samples come from; sample ``i`` is a pure function of ``i``."""

    @property
    def num_samples(self) -> int:
        """Samples in the stage's dataset (the data order permutes these)."""
        ...

    def micro_batches(self, indices: list[int], *, micro_batch_size: int) -> list[MicroBatch]:
        """Turn this rank's sample indices of one step into micro-batches."""
        ...


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step did, summed or averaged over every rank."""

    loss: float
    tokens: int
    """Real tokens processed on all ranks (added to tokens seen)."""
    grad_norm: float
    metrics: dict[str, float] = field(default_factory=dict)
    """Stage-specific values for metrics.jsonl and MLflow (reward, kl, ...)."""


class Objective(Protocol[BatchT]):
    """How a stage turns one step's samples into parameter updates."""

    def start(self, job: TrainJob, ctx: DistContext) -> None:
        """Build what the objective needs besides the policy (before any state is restored)."""
        ...

    def prepare(self, indices: list[int], *, job: TrainJob, step: int) -> BatchT:
        """This rank's batch of step ``step`` from its sample indices; local, no collectives."""
        ...

    def update(
        self,
        batch: BatchT,
        *,
        job: TrainJob,
        ctx: DistContext,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        step: int,
    ) -> StepOutcome:
        """Compute gradients and step the optimizer (lr already set); collective."""
        ...


class Recorder(Protocol):
    """Where rank 0 records metrics and release checkpoints (`openrelease.record.tracking`)."""

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        """Record one step's metrics."""
        ...

    def log_checkpoint(self, meta: CheckpointMeta, *, path: Path) -> None:
        """Record a release checkpoint written at ``path``."""
        ...


@dataclass(frozen=True)
class TrainJob:
    """Everything one stage run needs; built by `openrelease.train.run_stage`."""

    stage: str
    params: TrainStageParams
    model: ModelParams
    compute: ComputeParams
    seed: int
    project_dir: Path
    source: BatchSource
    data_digest: str
    tokenizer_dir: Path
    vocab_size: int
    special: SpecialTokens
    params_digest: str
    init_checkpoint: Path | None = None
    init_digest: str | None = None
    base_model: PinnedSource | None = None
    """The existing model the chain started from; set, the model is loaded from
    ``init_checkpoint``'s own config.json (any architecture) instead of the model params."""
    objective: Objective[Any] | None = None
    """None: next-token cross-entropy on ``source`` (`TokenObjective`)."""
    recorder: Recorder | None = None
    """Receives metrics and checkpoints on rank 0; None records only to files."""
    stop_at_step: int | None = None
    """Return after this step (a replay); the schedule still runs to ``params.num_steps``."""
