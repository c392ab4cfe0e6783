"""Token ids of documents, in this process or in ``num_proc`` worker processes, in order.

Its own module, importing only NumPy and tokenizers, because every spawned worker imports the
module that defines its task: this one costs about 0.1 s to import where `pack` (pydantic
manifests and all) cost 0.3 s, and a worker encodes nothing until it is imported.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from multiprocessing.pool import AsyncResult

import numpy as np
from tokenizers import Tokenizer

IN_FLIGHT_PER_PROC = 2
"""Chunks per worker process submitted ahead of the one being packed."""
Doc = dict[str, str]

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


Encoded = tuple[np.ndarray, np.ndarray]
"""A chunk's token ids end to end (int32) and each document's count (int64): arrays, so they
cross between processes as bytes, not as millions of pickled ints."""


def _encode(tokenizer: Tokenizer, texts: list[str]) -> Encoded:
    ids = [e.ids for e in tokenizer.encode_batch(texts)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def _encode_chunk(texts: list[str]) -> Encoded:
    assert _worker_tokenizer is not None, "the pool initialiser loads the tokenizer"
    return _encode(_worker_tokenizer, texts)


@contextmanager
def _workers_env(values: dict[str, str]) -> Iterator[None]:
    """``values`` in os.environ while worker processes start (they copy it), then as before."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def encode_documents(
    tokenizer: Tokenizer, chunks: Iterable[list[Doc]], *, num_proc: int
) -> Iterator[tuple[list[Doc], Encoded]]:
    """Each chunk of documents with the token ids of their texts (`Encoded`), in order.

    ``num_proc`` > 1 tokenises in processes, ``IN_FLIGHT_PER_PROC * num_proc`` chunks ahead.
    """
    if num_proc <= 1:
        for chunk in chunks:
            yield chunk, _encode(tokenizer, [d["text"] for d in chunk])
        return
    # spawn: the parent's tokenizers thread pool must not be forked; each worker single-threaded
    # so num_proc processes use num_proc cores (the variable is set for the workers only).
    ctx = multiprocessing.get_context("spawn")
    with _workers_env({"TOKENIZERS_PARALLELISM": "false"}):
        pool = ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer.to_str(),))
    with pool:
        pending: deque[tuple[list[Doc], AsyncResult[Encoded]]] = deque()
        for chunk in chunks:
            texts = [d["text"] for d in chunk]
            pending.append((chunk, pool.apply_async(_encode_chunk, (texts,))))
            if len(pending) > IN_FLIGHT_PER_PROC * num_proc:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()
