"""The data order: which samples global step N trains on, as a pure function of its inputs.

Positions run through seeded per-epoch permutations, so the global batch of a step does not
depend on the world size; each rank takes a contiguous slice of it.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

from openrelease.digest import sha256_bytes


@lru_cache(maxsize=8)
def _epoch_permutation(seed: int, data_digest: str, stage: str, epoch: int, n: int) -> np.ndarray:
    key = hashlib.sha256(f"order:{seed}:{data_digest}:{stage}:{epoch}".encode()).digest()
    # PCG64 seeded through SeedSequence: numpy keeps this stream stable across releases.
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))
    perm = rng.permutation(n).astype(np.int64)
    perm.setflags(write=False)
    return perm


def global_batch(
    *,
    seed: int,
    data_digest: str,
    stage: str,
    step: int,
    num_samples: int,
    global_batch_size: int,
) -> list[int]:
    """Sample indices of global optimizer step ``step`` (1-based), for any world size."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if num_samples < 1:
        raise ValueError(f"stage {stage} has no samples")
    start = (step - 1) * global_batch_size
    out: list[int] = []
    for position in range(start, start + global_batch_size):
        epoch, offset = divmod(position, num_samples)
        out.append(int(_epoch_permutation(seed, data_digest, stage, epoch, num_samples)[offset]))
    return out


def rank_slice(batch: list[int], *, rank: int, world_size: int) -> list[int]:
    """The contiguous share of ``batch`` that ``rank`` trains on."""
    if len(batch) % world_size:
        raise ValueError(f"batch of {len(batch)} does not split over {world_size} ranks")
    per_rank = len(batch) // world_size
    return batch[rank * per_rank : (rank + 1) * per_rank]


def order_digest(indices: list[int]) -> str:
    """Digest of a sequence of sample indices (int64 little-endian)."""
    return sha256_bytes(np.asarray(indices, dtype="<i8").tobytes())


def stage_order(
    *,
    seed: int,
    data_digest: str,
    stage: str,
    num_steps: int,
    num_samples: int,
    global_batch_size: int,
) -> list[list[int]]:
    """The global batch of every step 1..num_steps of a stage."""
    return [
        global_batch(
            seed=seed,
            data_digest=data_digest,
            stage=stage,
            step=step,
            num_samples=num_samples,
            global_batch_size=global_batch_size,
        )
        for step in range(1, num_steps + 1)
    ]
