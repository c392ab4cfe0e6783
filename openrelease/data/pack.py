"""Tokenise and pack pretraining documents into shards: in processes, incrementally, resumably.

Documents are read from a JSONL file (`records`) and tokenised in chunks of `CHUNK_DOCS`, in
``num_proc`` worker processes when asked (results come back in document order, so the output
is byte-identical to one process; at most `IN_FLIGHT_PER_PROC` chunks a process are submitted
and not yet taken, however fast the workers are), and packed as one ``<bos> doc <eos>`` stream
cut into ``seq_len`` rows. A shard is written as soon as it holds ``seqs_per_shard`` rows, so
memory holds one shard and the chunks in flight, never the whole corpus or token stream.
Shards and the documents' JSONL go to a work folder keyed by a digest of everything that
decides their bytes; after each shard a progress file records where the stream stood, so a
killed run resumes after its last complete shard.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from openrelease.data.encoding import Encoded, encode_documents
from openrelease.data.records import FieldSplicer, iter_lines
from openrelease.digest import sha256_bytes, sha256_file, sha256_json
from openrelease.errors import DataError
from openrelease.manifest import ShardEntry, read_json, write_json

PROGRESS = "progress.json"
CARRY = "carry.npy"
DOCS_FILE = "pretrain_docs.jsonl"
SHARD_DIR = "pretrain"
CHUNK_DOCS = 512
"""Documents per tokenisation task."""


Line = tuple[bytes, dict[str, str]]
"""A document's JSONL line and its record."""


def _chunks(docs_path: Path, start: int) -> Iterator[list[Line]]:
    """The documents of ``docs_path`` from ``start`` on, `CHUNK_DOCS` at a time."""
    docs = iter_lines(docs_path, start=start)
    while chunk := list(itertools.islice(docs, CHUNK_DOCS)):
        yield chunk


def _text(line: Line) -> str:
    return line[1]["text"]


@dataclass
class _Progress:
    plan: str
    next_doc: int
    stream_tokens: int
    """Tokens emitted into the stream so far (the next document's offset)."""
    carry: np.ndarray
    """Tokens after the last complete shard, not yet in a shard (int32)."""
    docs_bytes: int
    """Bytes of the documents' JSONL written for documents before ``next_doc``."""
    shards: list[ShardEntry]

    def save(self, work_dir: Path) -> None:
        carry = np.asarray(self.carry, dtype=np.int64)
        tmp = work_dir / (CARRY + ".tmp")
        with tmp.open("wb") as f:
            np.save(f, carry, allow_pickle=False)
        os.replace(tmp, work_dir / CARRY)
        write_json(
            work_dir / PROGRESS,
            {
                "plan": self.plan,
                "next_doc": self.next_doc,
                "stream_tokens": self.stream_tokens,
                "carry_sha256": sha256_file(work_dir / CARRY),
                "docs_bytes": self.docs_bytes,
                "shards": [s.model_dump(mode="json") for s in self.shards],
            },
        )


def _resume(work_dir: Path, plan: str) -> _Progress | None:
    """The progress of an earlier run of the same plan whose shards are all intact, if any."""
    if not (work_dir / PROGRESS).is_file():
        return None
    raw = read_json(work_dir / PROGRESS)
    if raw.get("plan") != plan:
        return None
    shards = [ShardEntry.model_validate(s) for s in raw["shards"]]
    docs = work_dir / DOCS_FILE
    if not docs.is_file() or docs.stat().st_size < raw["docs_bytes"]:
        return None
    for s in shards:
        path = work_dir / s.path
        if not path.is_file() or sha256_file(path) != s.sha256:
            return None
    carry_path = work_dir / CARRY
    if not carry_path.is_file() or sha256_file(carry_path) != raw["carry_sha256"]:
        return None
    return _Progress(
        plan=plan,
        next_doc=raw["next_doc"],
        stream_tokens=raw["stream_tokens"],
        carry=np.load(carry_path, allow_pickle=False).astype(np.int32),
        docs_bytes=raw["docs_bytes"],
        shards=shards,
    )


@dataclass(frozen=True)
class Packed:
    """What packing wrote: shards, the documents' JSONL, and the stream's size."""

    shards: list[ShardEntry]
    docs_path: Path
    num_seqs: int
    resumed_shards: int
    """Shards kept from a killed earlier run."""


def pack_documents(
    docs_path: Path,
    *,
    tokenizer: Tokenizer,
    bos_id: int | None,
    eos_id: int,
    seq_len: int,
    seqs_per_shard: int,
    num_proc: int,
    work_dir: Path,
) -> Packed:
    """Tokenise the documents of ``docs_path``, pack them, write shards and JSONL in ``work_dir``.

    ``docs_path`` holds one record (with its id and text) per document, as `records` writes
    them. Each document gets ``offset`` and ``length`` (its span in the token stream) in the
    JSONL. ``work_dir`` is reused when it holds an interrupted run of the same inputs.

    Raises:
        DataError: The corpus has fewer tokens than one sequence.
    """
    plan = sha256_json(
        {
            "docs": sha256_file(docs_path),
            "tokenizer": sha256_bytes(tokenizer.to_str().encode()),
            "bos": bos_id,
            "eos": eos_id,
            "seq_len": seq_len,
            "seqs_per_shard": seqs_per_shard,
        }
    )
    progress = _resume(work_dir, plan)
    resumed = len(progress.shards) if progress is not None else 0
    if progress is None:
        shutil.rmtree(work_dir, ignore_errors=True)
        (work_dir / SHARD_DIR).mkdir(parents=True)
        progress = _Progress(plan, 0, 0, np.zeros(0, dtype=np.int32), 0, [])
    chunks = _chunks(docs_path, progress.next_doc)
    encoded = encode_documents(tokenizer, chunks, _text, num_proc=num_proc)
    _pack_stream(
        encoded,
        progress,
        work_dir,
        head=[] if bos_id is None else [bos_id],
        eos_id=eos_id,
        seq_len=seq_len,
        seqs_per_shard=seqs_per_shard,
        resumed=bool(resumed),
    )
    num_seqs = sum(s.num_seqs for s in progress.shards)
    if num_seqs == 0:
        raise DataError(
            f"the pretraining corpus has {progress.stream_tokens} tokens, fewer than one "
            f"sequence of data.seq_len {seq_len}; add data or lower seq_len."
        )
    return Packed(progress.shards, work_dir / DOCS_FILE, num_seqs, resumed)


def _with_markers(
    encoded: Encoded, head: list[int], eos_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The chunk as stream tokens, ``head + ids + eos`` per document.

    Returns the stream, each document's length in it and where each one ends.
    """
    flat, lengths = encoded
    sizes = lengths + len(head) + 1
    ends = np.cumsum(sizes)
    stream = np.empty(int(ends[-1]), dtype=np.int32)
    is_id = np.ones(len(stream), dtype=bool)
    starts = ends - sizes
    for j, token in enumerate(head):
        stream[starts + j], is_id[starts + j] = token, False
    stream[ends - 1], is_id[ends - 1] = eos_id, False
    stream[is_id] = flat
    return stream, sizes, ends


def _pack_stream(
    encoded: Iterable[tuple[Sequence[Line], Encoded]],
    progress: _Progress,
    work_dir: Path,
    *,
    head: list[int],
    eos_id: int,
    seq_len: int,
    seqs_per_shard: int,
    resumed: bool,
) -> None:
    """Append the documents to the JSONL and their tokens to the stream; cut it into shards.

    Each document adds ``head + ids + eos``; a shard (and the progress, at the document that
    completed it) is written each time the stream holds one, and the whole rows left at the end
    make the last shard.
    """
    shard_tokens = seq_len * seqs_per_shard
    with (work_dir / DOCS_FILE).open("r+b" if resumed else "wb") as out:
        out.truncate(progress.docs_bytes)
        out.seek(progress.docs_bytes)
        index = progress.next_doc
        splice = FieldSplicer(("offset", "length"))
        for docs, ids in encoded:
            stream, sizes, ends = _with_markers(ids, head, eos_id)
            taken = 0  # the chunk's stream tokens before this are in progress.carry
            for (line, doc), length, end in zip(docs, sizes.tolist(), ends.tolist(), strict=True):
                out.write(splice(line, doc, (str(progress.stream_tokens), str(length))))
                progress.stream_tokens += length
                index += 1
                if len(progress.carry) + end - taken < shard_tokens:
                    continue
                carry = np.concatenate([progress.carry, stream[taken:end]])
                taken = end
                while len(carry) >= shard_tokens:
                    rows = carry[:shard_tokens].reshape(seqs_per_shard, seq_len)
                    carry = carry[shard_tokens:]
                    _finish_shard(rows, work_dir, progress)
                out.flush()
                os.fsync(out.fileno())
                progress.next_doc, progress.carry = index, carry.copy()
                progress.docs_bytes = out.tell()
                progress.save(work_dir)
            progress.carry = np.concatenate([progress.carry, stream[taken:]])
        carry = progress.carry
        num_full = len(carry) // seq_len
        if num_full:
            rows = carry[: num_full * seq_len].reshape(num_full, seq_len)
            _finish_shard(rows, work_dir, progress)


def _finish_shard(rows: np.ndarray, work_dir: Path, progress: _Progress) -> None:
    """Write one shard atomically and add it to ``progress``."""
    rel = f"{SHARD_DIR}/shard-{len(progress.shards):05d}.npy"
    path = work_dir / rel
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.save(f, np.ascontiguousarray(rows), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    progress.shards.append(
        ShardEntry(
            path=rel,
            sha256=sha256_file(path),
            size=path.stat().st_size,
            num_seqs=int(rows.shape[0]),
            num_tokens=int(rows.size),
        )
    )
