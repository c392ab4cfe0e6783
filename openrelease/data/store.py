"""Read access to the data stage's outputs: manifest, tokenizer, packed shards and records."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from openrelease.errors import ArtifactError
from openrelease.layout import STAGE_MANIFEST
from openrelease.manifest import DataManifest, DatasetEntry, read_model
from openrelease.safeio import no_duplicate_keys

RECORD_ROLES = ("sft", "dpo", "distill", "grpo")


def read_jsonl(path: Path) -> list[dict[str, str]]:
    """Read a JSONL file we wrote (one object per line)."""
    try:
        with path.open(encoding="utf-8") as f:
            return [
                json.loads(line, object_pairs_hook=no_duplicate_keys) for line in f if line.strip()
            ]
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing; run `dvc repro data`.", path=str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(
            f"{path} is corrupt; run `dvc repro -f data`.", path=str(path)
        ) from None


class DataStore:
    """The data stage's folder (``artifacts/data`` by default), opened read-only."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.manifest = read_model(data_dir / STAGE_MANIFEST, DataManifest)
        self._records: dict[str, list[dict[str, str]]] = {}

    @property
    def tokenizer_dir(self) -> Path:
        """The transformers tokenizer folder."""
        return self.data_dir / self.manifest.tokenizer_dir

    @cached_property
    def _shards(self) -> list[np.ndarray]:
        return [
            np.load(self.data_dir / s.path, mmap_mode="r", allow_pickle=False)
            for s in self.manifest.shards
        ]

    def num_samples(self, role: str) -> int:
        """Samples in the dataset of training stage ``role``."""
        if role == "pretrain":
            return self.manifest.num_pretrain_seqs
        return self._dataset_entry(role).num_records

    def pretrain_sequence(self, index: int) -> np.ndarray:
        """The packed token sequence ``index`` (int32, length seq_len)."""
        if not 0 <= index < self.manifest.num_pretrain_seqs:
            raise IndexError(f"pretrain sequence {index} out of range")
        for shard in self._shards:
            if index < len(shard):
                return np.asarray(shard[index], dtype=np.int32)
            index -= len(shard)
        raise IndexError("shards are shorter than the manifest says")

    @cached_property
    def doc_offsets(self) -> list[int]:
        """Stream offset of each pretraining document (ascending: written in stream order)."""
        return [int(d["offset"]) for d in self.records("pretrain_docs")]

    def records(self, role: str) -> list[dict[str, str]]:
        """The records of ``role`` (sft, dpo, distill, grpo, pretrain_docs, eval_*)."""
        if role not in self._records:
            self._records[role] = read_jsonl(self.data_dir / self._dataset_entry(role).path)
        return self._records[role]

    def _dataset_entry(self, role: str) -> DatasetEntry:
        try:
            return self.manifest.datasets[role]
        except KeyError:
            known = ", ".join(sorted(self.manifest.datasets))
            raise ArtifactError(f"data manifest has no dataset {role!r} (has: {known}).") from None
