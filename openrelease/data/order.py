"""The data order: which samples global step N trains on, as a pure function of its inputs.

Global position p (0-based, ``(step - 1) * global_batch_size + i``) lies in epoch
``p // n`` at offset ``p % n``; the sample is ``perm_epoch(offset)``, where ``perm_epoch`` is a
seeded, invertible permutation of ``0..n-1``: a balanced Feistel network over the smallest
power-of-four domain that holds n, cycle-walked back into ``0..n-1``. Nothing is materialised,
so the batch of a step costs O(batch size) and "which steps saw sample i" costs O(1) per epoch
(`steps_of`), whatever n is. The global batch does not depend on the world size; each rank
takes a contiguous slice of it.

The algorithm is versioned (`ORDER_ALGORITHM`, recorded in the data manifest); changing it
changes every order digest.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

from openrelease.digest import sha256_bytes
from openrelease.errors import DataError

ORDER_ALGORITHM = "feistel-v1"
"""The order this code computes; a data manifest naming another one is refused."""
_ROUNDS = 8
_U64 = np.uint64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixing bijection of uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    out: np.ndarray = x ^ (x >> _U64(31))
    return out


class EpochPermutation:
    """One epoch's permutation of ``0..n-1``, evaluated pointwise (`forward`, `inverse`)."""

    def __init__(self, key: bytes, n: int) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = _U64((1 << self.half) - 1)
        words = hashlib.sha512(key).digest() + hashlib.sha512(key + b"/2").digest()
        self.keys = np.frombuffer(words[: 8 * _ROUNDS], dtype="<u8").astype(np.uint64)

    def _round(self, right: np.ndarray, k: np.uint64) -> np.ndarray:
        return _mix(right ^ k) & self.mask

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = _U64(self.half)
        left, right = x >> half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ self._round(right, k)
        out: np.ndarray = (left << half) | right
        return out

    def _decrypt(self, y: np.ndarray) -> np.ndarray:
        half = _U64(self.half)
        left, right = y >> half, y & self.mask
        for k in self.keys[::-1]:
            left, right = right ^ self._round(left, k), left
        out: np.ndarray = (left << half) | right
        return out

    def _walk(self, x: np.ndarray, step: str) -> np.ndarray:
        # Cycle walking: re-apply until the value is back in 0..n-1 (the domain is < 4n, so
        # few rounds on average); it stays a bijection of 0..n-1, and the inverse walks back.
        fn = self._encrypt if step == "forward" else self._decrypt
        y = fn(x)
        out_of_range = y >= _U64(self.n)
        while out_of_range.any():
            y[out_of_range] = fn(y[out_of_range])
            out_of_range = y >= _U64(self.n)
        return y

    def forward(self, offsets: np.ndarray) -> np.ndarray:
        """Sample ids at epoch offsets ``offsets`` (each in 0..n-1)."""
        return self._walk(np.asarray(offsets, dtype=np.uint64), "forward").astype(np.int64)

    def inverse(self, samples: np.ndarray) -> np.ndarray:
        """Epoch offsets at which ``samples`` (each in 0..n-1) are trained on."""
        return self._walk(np.asarray(samples, dtype=np.uint64), "inverse").astype(np.int64)


@lru_cache(maxsize=64)
def epoch_permutation(
    seed: int, data_digest: str, stage: str, epoch: int, n: int
) -> EpochPermutation:
    """The permutation of epoch ``epoch`` of ``stage`` (keyed by seed and data digest)."""
    key = f"order:{ORDER_ALGORITHM}:{seed}:{data_digest}:{stage}:{epoch}".encode()
    return EpochPermutation(key, n)


def check_algorithm(algorithm: str, *, where: str) -> None:
    """Refuse data whose manifest records another order algorithm than this code computes."""
    if algorithm != ORDER_ALGORITHM:
        raise DataError(
            f"{where} was built for data order {algorithm!r}, this openrelease computes "
            f"{ORDER_ALGORITHM!r}; re-run `dvc repro data` (or use the release's version)."
        )


def positions_batch(
    *, seed: int, data_digest: str, stage: str, start: int, count: int, num_samples: int
) -> np.ndarray:
    """Sample ids at global positions ``start .. start + count - 1`` (int64)."""
    if num_samples < 1:
        raise ValueError(f"stage {stage} has no samples")
    positions = np.arange(start, start + count, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_samples)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs).tolist():
        sel = epochs == epoch
        perm = epoch_permutation(seed, data_digest, stage, int(epoch), num_samples)
        out[sel] = perm.forward(offsets[sel])
    return out


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
    ids = positions_batch(
        seed=seed,
        data_digest=data_digest,
        stage=stage,
        start=(step - 1) * global_batch_size,
        count=global_batch_size,
        num_samples=num_samples,
    )
    return [int(i) for i in ids]


def steps_of(
    index: int,
    *,
    seed: int,
    data_digest: str,
    stage: str,
    num_samples: int,
    global_batch_size: int,
    num_steps: int,
) -> list[int]:
    """The steps (1-based, ascending) of a ``num_steps`` run whose batches hold sample ``index``.

    One inverse permutation per epoch the run touches: O(epochs), independent of n.
    """
    if not 0 <= index < num_samples:
        raise ValueError(f"sample {index} is outside 0..{num_samples - 1}")
    total = num_steps * global_batch_size
    steps = []
    for epoch in range(-(-total // num_samples)):
        perm = epoch_permutation(seed, data_digest, stage, epoch, num_samples)
        position = epoch * num_samples + int(perm.inverse(np.asarray([index]))[0])
        if position < total:
            steps.append(position // global_batch_size + 1)
    return steps


def rank_slice(batch: list[int], *, rank: int, world_size: int) -> list[int]:
    """The contiguous share of ``batch`` that ``rank`` trains on."""
    if len(batch) % world_size:
        raise ValueError(f"batch of {len(batch)} does not split over {world_size} ranks")
    per_rank = len(batch) // world_size
    return batch[rank * per_rank : (rank + 1) * per_rank]


def order_digest(indices: list[int] | np.ndarray) -> str:
    """Digest of a sequence of sample indices (int64 little-endian)."""
    return sha256_bytes(np.asarray(indices, dtype="<i8").tobytes())


def range_digest(
    *,
    seed: int,
    data_digest: str,
    stage: str,
    first_step: int,
    last_step: int,
    num_samples: int,
    global_batch_size: int,
) -> str:
    """`order_digest` of the sample ids of steps ``first_step..last_step`` (a checkpoint's)."""
    start = (first_step - 1) * global_batch_size
    count = max(0, last_step - first_step + 1) * global_batch_size
    return order_digest(
        positions_batch(
            seed=seed,
            data_digest=data_digest,
            stage=stage,
            start=start,
            count=count,
            num_samples=num_samples,
        )
    )
