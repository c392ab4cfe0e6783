"""Pretraining: next-token prediction on the data stage's packed sequences, from random init."""

from __future__ import annotations

import numpy as np
import torch

from openrelease.data.store import DataStore
from openrelease.train.job import MicroBatch


class PackedSource:
    """Packed pretraining sequences; every token is a target (no padding)."""

    def __init__(self, store: DataStore) -> None:
        self.store = store

    @property
    def num_samples(self) -> int:
        """Packed sequences in the data stage's shards."""
        return self.store.num_samples("pretrain")

    def micro_batches(self, indices: list[int], *, micro_batch_size: int) -> list[MicroBatch]:
        """Stack ``micro_batch_size`` sequences per micro-batch, in order."""
        out = []
        for start in range(0, len(indices), micro_batch_size):
            rows = [
                self.store.pretrain_sequence(i) for i in indices[start : start + micro_batch_size]
            ]
            ids = torch.from_numpy(np.stack(rows).astype(np.int64))
            out.append(MicroBatch(input_ids=ids, labels=ids.clone(), attention_mask=None))
        return out
