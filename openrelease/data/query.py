"""Answer "which data did step N see" and "which steps saw this document" from the data order."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from pydantic import BaseModel, ConfigDict

from openrelease.data.order import check_algorithm, global_batch, order_digest, steps_of
from openrelease.data.store import DataStore
from openrelease.errors import DataError
from openrelease.params import PipelineParams, StageName

_RECORD_TEXT_FIELDS = ("prompt", "response", "chosen", "rejected", "reasoning", "answer")


class Sample(BaseModel):
    """One sample of a batch: its index in the stage's dataset and its content."""

    model_config = ConfigDict(frozen=True)
    index: int
    doc_ids: tuple[str, ...]
    sources: tuple[str, ...]
    """The source of each document (``synthetic``, an import path, ``hf:ORG/NAME``)."""
    text: str


class BatchReport(BaseModel):
    """The exact samples global step ``step`` of ``stage`` trains on."""

    model_config = ConfigDict(frozen=True)
    stage: str
    step: int
    data_digest: str
    order_digest: str
    samples: tuple[Sample, ...]
    licenses: dict[str, str | None]
    """Each source of these samples -> its license tag (None: not stated)."""


class Sighting(BaseModel):
    """A document seen by a stage at some steps."""

    model_config = ConfigDict(frozen=True)
    doc_id: str
    stage: str
    steps: tuple[int, ...]


class WhereReport(BaseModel):
    """Every stage and step that saw the matching documents."""

    model_config = ConfigDict(frozen=True)
    query: str
    doc_ids: tuple[str, ...]
    sightings: tuple[Sighting, ...]
    total_matches: int
    """Documents that matched; more than ``doc_ids`` when the list was cut at ``limit``."""
    truncated: bool


def _docs_of_sequence(store: DataStore, index: int) -> list[dict[str, str]]:
    """The documents whose token span overlaps packed sequence ``index``."""
    docs, offsets = store.records("pretrain_docs"), store.doc_offsets
    seq_len = store.manifest.seq_len
    lo, hi = index * seq_len, (index + 1) * seq_len
    first = max(bisect.bisect_right(offsets, lo) - 1, 0)
    last = bisect.bisect_left(offsets, hi)
    return [d for d in docs[first:last] if int(d["offset"]) + int(d["length"]) > lo]


def provenance(store: DataStore, kind: str, index: int) -> tuple[list[str], list[str]]:
    """The document ids sample ``index`` of a stage of ``kind`` holds, and each one's source."""
    one = kind == "pretrain"
    docs = _docs_of_sequence(store, index) if one else [store.records(kind)[index]]
    return [d["id"] for d in docs], [d.get("source", "") for d in docs]


def _sample(store: DataStore, kind: str, index: int, decode: Callable[[list[int]], str]) -> Sample:
    if kind == "pretrain":
        ids = store.pretrain_sequence(index).tolist()
        docs = _docs_of_sequence(store, index)
        return Sample(
            index=index,
            doc_ids=tuple(d["id"] for d in docs),
            sources=tuple(d.get("source", "") for d in docs),
            text=decode(ids),
        )
    record = store.records(kind)[index]
    text = "\n".join(f"{k}: {record[k]}" for k in _RECORD_TEXT_FIELDS if k in record)
    return Sample(
        index=index, doc_ids=(record["id"],), sources=(record.get("source", ""),), text=text
    )


def _check_step(params: PipelineParams, stage: StageName, step: int) -> None:
    num_steps = params.stage(stage).num_steps
    if not 1 <= step <= num_steps:
        raise DataError(
            f"step {step} is outside stage {stage}'s 1..{num_steps}; pick a step in "
            "that range (see the stage's num_steps in params.yaml)."
        )


def batch_at(
    store: DataStore, params: PipelineParams, *, stage: StageName, step: int
) -> BatchReport:
    """Return the global batch (decoded) that ``stage`` trains on at ``step``."""
    from tokenizers import Tokenizer

    _check_step(params, stage, step)
    check_algorithm(store.manifest.order_algorithm, where=str(store.data_dir))
    kind = params.spec(stage).kind  # the data role the stage trains on
    indices = global_batch(
        seed=params.seed,
        data_digest=store.manifest.data_digest,
        stage=stage,
        step=step,
        num_samples=store.num_samples(kind),
        global_batch_size=params.stage(stage).global_batch_size,
    )
    tokenizer = Tokenizer.from_file(str(store.tokenizer_dir / "tokenizer.json"))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    samples = tuple(_sample(store, kind, i, decode) for i in indices)
    known = {key: s.license for s in store.manifest.sources for key in (s.name, s.path)}
    return BatchReport(
        stage=stage,
        step=step,
        data_digest=store.manifest.data_digest,
        order_digest=order_digest(indices),
        samples=samples,
        licenses={name: known.get(name) for s in samples for name in s.sources},
    )


_ID_ROLES = {
    "doc": "pretrain_docs",
    "sft": "sft",
    "dpo": "dpo",
    "distill": "distill",
    "grpo": "grpo",
}
"""Id prefix -> the role whose records carry it (ids are ``<prefix>-<index>``)."""


def _record_by_id(store: DataStore, doc_id: str) -> dict[str, str] | None:
    """The training record ``doc_id`` names: O(1) from the id's role and index."""
    prefix, _, digits = doc_id.rpartition("-")
    role = _ID_ROLES.get(prefix)
    if role is None or not digits.isdigit():
        return None
    index = int(digits)
    records = store.records(role)
    if index >= len(records) or records[index]["id"] != doc_id:
        return None
    return records[index]


def _text_matches(store: DataStore, text: str) -> Iterator[str]:
    for role in _ID_ROLES.values():
        for record in store.records(role):
            if any(text in record.get(k, "") for k in ("text", *_RECORD_TEXT_FIELDS)):
                yield record["id"]


def where_seen(
    store: DataStore,
    params: PipelineParams,
    *,
    doc_id: str | None = None,
    text: str | None = None,
    limit: int = 50,
) -> WhereReport:
    """List the stages and steps whose batches contained the matching documents.

    ``--doc`` looks the document up by its id and inverts the data order for each sample that
    holds it (O(epochs) each); ``--text`` reports the first ``limit`` matching documents and
    says how many matched in all.
    """
    if (doc_id is None) == (text is None):
        raise DataError("give exactly one of --doc ID or --text TEXT.")
    if limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}.")
    check_algorithm(store.manifest.order_algorithm, where=str(store.data_dir))
    if doc_id is not None:
        ids = [doc_id] if _record_by_id(store, doc_id) is not None else []
        total = len(ids)
    else:
        assert text is not None, "one of doc_id and text is given"
        every = list(_text_matches(store, text))
        ids, total = every[:limit], len(every)
    if not ids:
        raise DataError(
            f"no document matches {doc_id or text!r}; check the id "
            "(e.g. doc-0000012, sft-0000003) or the text."
        )
    wanted = set(ids)
    sightings = []
    for stage in params.train_stages:
        # Map dataset index -> doc ids, then scan the stage's whole order once.
        kind = params.spec(stage).kind
        index_to_ids = _index_map(store, kind, wanted)
        if not index_to_ids:
            continue
        section = params.stage(stage)
        hits: dict[str, set[int]] = {}
        for index, found_ids in index_to_ids.items():
            steps = steps_of(
                index,
                seed=params.seed,
                data_digest=store.manifest.data_digest,
                stage=stage,
                num_samples=store.num_samples(kind),
                global_batch_size=section.global_batch_size,
                num_steps=section.num_steps,
            )
            for found_id in found_ids:
                hits.setdefault(found_id, set()).update(steps)
        sightings += [
            Sighting(doc_id=d, stage=stage, steps=tuple(sorted(s))) for d, s in hits.items() if s
        ]
    return WhereReport(
        query=doc_id or text or "",
        doc_ids=tuple(ids),
        sightings=tuple(sightings),
        total_matches=total,
        truncated=total > len(ids),
    )


def _index_map(store: DataStore, kind: str, wanted: set[str]) -> dict[int, tuple[str, ...]]:
    """Dataset index -> the wanted documents it holds, for a stage of ``kind``.

    A packed sequence may hold several documents, and a document may span several sequences.
    """
    out: dict[int, tuple[str, ...]] = {}
    seq_len = store.manifest.seq_len
    for doc_id in sorted(wanted):
        record = _record_by_id(store, doc_id)
        role = _ID_ROLES.get(doc_id.rpartition("-")[0])
        if record is None or (role == "pretrain_docs") != (kind == "pretrain"):
            continue
        if kind != "pretrain":
            if role == kind:
                out[int(doc_id.rpartition("-")[2])] = (doc_id,)
            continue
        start, end = int(record["offset"]), int(record["offset"]) + int(record["length"])
        last = min((end - 1) // seq_len + 1, store.manifest.num_pretrain_seqs)
        for index in range(start // seq_len, last):
            out[index] = (*out.get(index, ()), doc_id)
    return out
