"""Token ids of documents, in this process or in ``num_proc`` worker processes, in order.

Its own module, importing only NumPy and tokenizers, because the workers' fork server imports
the module that defines their task before the first one starts: this one costs about 0.1 s to
import where `pack` (pydantic manifests and all) cost 0.3 s.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing.pool import AsyncResult
from typing import TypeVar

import numpy as np
from tokenizers import Tokenizer

IN_FLIGHT_PER_PROC = 2
"""Chunks per worker process submitted ahead of the one being packed."""
T = TypeVar("T")

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    # One thread a worker, so num_proc processes use num_proc cores (tokenizers reads the
    # variable when it encodes; it is set in the worker only, never in the caller).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
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


def encode_documents(
    tokenizer: Tokenizer,
    chunks: Iterable[Sequence[T]],
    text: Callable[[T], str],
    *,
    num_proc: int,
) -> Iterator[tuple[Sequence[T], Encoded]]:
    """Each chunk of documents with the token ids of their texts (`Encoded`), in order.

    ``text`` gives a document's text. ``num_proc`` > 1 tokenises in processes,
    ``IN_FLIGHT_PER_PROC * num_proc`` chunks ahead.
    """
    if num_proc <= 1:
        for chunk in chunks:
            yield chunk, _encode(tokenizer, [text(d) for d in chunk])
        return
    # forkserver: workers fork from a fresh server process that has imported this module once,
    # never from the caller, whose threads (tokenizers' pool, MLflow's) must not be forked;
    # each worker starts in 10 ms where a spawned one imports NumPy and tokenizers again.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    pool = ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer.to_str(),))
    with pool:
        pending: deque[tuple[Sequence[T], AsyncResult[Encoded]]] = deque()
        for chunk in chunks:
            texts = [text(d) for d in chunk]
            pending.append((chunk, pool.apply_async(_encode_chunk, (texts,))))
            if len(pending) > IN_FLIGHT_PER_PROC * num_proc:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()
