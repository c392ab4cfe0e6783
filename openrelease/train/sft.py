"""SFT: chat-formatted prompt/response pairs with the loss on assistant tokens only.

The batch source here also serves any stage that trains on (prompt, response) pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from transformers import PreTrainedTokenizerBase

from openrelease.errors import ArtifactError
from openrelease.train.job import IGNORE_INDEX, MicroBatch

USER, ASSISTANT, EOS = "<|user|>", "<|assistant|>", "<|eos|>"


class ChatSource:
    """``<|user|>{prompt}<|assistant|>{response}<|eos|>``; labels mask everything but the reply.

    Sequences are cut to ``seq_len`` tokens and right-padded to the longest in a micro-batch.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
    ) -> None:
        self.pairs = pairs
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        pad_id = tokenizer.pad_token_id
        if not isinstance(pad_id, int):
            raise ArtifactError("the tokenizer has no pad token; re-run `dvc repro data`.")
        self.pad_id = pad_id
        self.encode = lru_cache(maxsize=65536)(self._encode)

    @property
    def num_samples(self) -> int:
        """Prompt/response pairs."""
        return len(self.pairs)

    def _encode(self, index: int) -> tuple[list[int], list[int]]:
        prompt, response = self.pairs[index]
        # Special tokens are split out before BPE, so encoding the two parts separately gives
        # the same ids as encoding the rendered chat template.
        head = self.tokenizer.encode(f"{USER}{prompt}{ASSISTANT}", add_special_tokens=False)
        tail = self.tokenizer.encode(f"{response}{EOS}", add_special_tokens=False)
        ids = (head + tail)[: self.seq_len]
        labels = ([IGNORE_INDEX] * len(head) + tail)[: self.seq_len]
        return ids, labels

    def micro_batches(self, indices: list[int], *, micro_batch_size: int) -> list[MicroBatch]:
        """Encode, right-pad and stack ``micro_batch_size`` pairs per micro-batch."""
        out = []
        for start in range(0, len(indices), micro_batch_size):
            rows = [self.encode(i) for i in indices[start : start + micro_batch_size]]
            width = max(len(ids) for ids, _ in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (row_ids, row_labels) in enumerate(rows):
                ids[r, : len(row_ids)] = torch.tensor(row_ids)
                labels[r, : len(row_labels)] = torch.tensor(row_labels)
                mask[r, : len(row_ids)] = 1
            out.append(MicroBatch(input_ids=ids, labels=labels, attention_mask=mask))
        return out


def sft_pairs(records: Sequence[dict[str, str]]) -> list[tuple[str, str]]:
    """(prompt, response) of the data stage's sft records."""
    return [(r["prompt"], r["response"]) for r in records]
