"""Answer "which data did step N see" and "which steps saw this document" from the data order."""

from __future__ import annotations

import bisect
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

from openrelease.data.order import global_batch, order_digest, stage_order
from openrelease.data.store import DataStore
from openrelease.errors import DataError
from openrelease.params import PipelineParams, StageName

_RECORD_TEXT_FIELDS = ("prompt", "response", "chosen", "rejected", "reasoning", "answer")


class Sample(BaseModel):
    """One sample of a batch: its index in the stage's dataset and its content."""

    model_config = ConfigDict(frozen=True)
    index: int
    doc_ids: tuple[str, ...]
    text: str


class BatchReport(BaseModel):
    """The exact samples global step ``step`` of ``stage`` trains on."""

    model_config = ConfigDict(frozen=True)
    stage: str
    step: int
    data_digest: str
    order_digest: str
    samples: tuple[Sample, ...]


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


def _docs_of_sequence(store: DataStore, index: int) -> tuple[str, ...]:
    """Ids of the documents whose token span overlaps packed sequence ``index``."""
    docs = store.records("pretrain_docs")  # written in stream order, so offsets ascend
    offsets = [int(d["offset"]) for d in docs]
    seq_len = store.manifest.seq_len
    lo, hi = index * seq_len, (index + 1) * seq_len
    first = max(bisect.bisect_right(offsets, lo) - 1, 0)
    last = bisect.bisect_left(offsets, hi)
    return tuple(d["id"] for d in docs[first:last] if int(d["offset"]) + int(d["length"]) > lo)


def _sample(store: DataStore, stage: str, index: int, decode: Callable[[list[int]], str]) -> Sample:
    if stage == "pretrain":
        ids = store.pretrain_sequence(index).tolist()
        text = decode(ids)
        return Sample(index=index, doc_ids=_docs_of_sequence(store, index), text=text)
    record = store.records(stage)[index]
    text = "\n".join(f"{k}: {record[k]}" for k in _RECORD_TEXT_FIELDS if k in record)
    return Sample(index=index, doc_ids=(record["id"],), text=text)


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
    indices = global_batch(
        seed=params.seed,
        data_digest=store.manifest.data_digest,
        stage=stage,
        step=step,
        num_samples=store.num_samples(stage),
        global_batch_size=params.stage(stage).global_batch_size,
    )
    tokenizer = Tokenizer.from_file(str(store.tokenizer_dir / "tokenizer.json"))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    return BatchReport(
        stage=stage,
        step=step,
        data_digest=store.manifest.data_digest,
        order_digest=order_digest(indices),
        samples=tuple(_sample(store, stage, i, decode) for i in indices),
    )


def _matching_ids(store: DataStore, *, doc_id: str | None, text: str | None) -> list[str]:
    roles = ["pretrain_docs", "sft", "dpo", "distill", "grpo"]
    found = []
    for role in roles:
        for record in store.records(role):
            if (doc_id is not None and record["id"] == doc_id) or (
                text is not None
                and any(text in record.get(k, "") for k in ("text", *_RECORD_TEXT_FIELDS))
            ):
                found.append(record["id"])
    return found


def where_seen(
    store: DataStore,
    params: PipelineParams,
    *,
    doc_id: str | None = None,
    text: str | None = None,
    limit: int = 50,
) -> WhereReport:
    """List the stages and steps whose batches contained the matching documents."""
    if (doc_id is None) == (text is None):
        raise DataError("give exactly one of --doc ID or --text TEXT.")
    ids = _matching_ids(store, doc_id=doc_id, text=text)[:limit]
    if not ids:
        raise DataError(
            f"no document matches {doc_id or text!r}; check the id "
            "(e.g. doc-0000012, sft-0000003) or the text."
        )
    wanted = set(ids)
    sightings = []
    for stage in params.train_stages:
        # Map dataset index -> doc ids, then scan the stage's whole order once.
        index_to_ids = _index_map(store, stage, wanted)
        if not index_to_ids:
            continue
        section = params.stage(stage)
        order = stage_order(
            seed=params.seed,
            data_digest=store.manifest.data_digest,
            stage=stage,
            num_steps=section.num_steps,
            num_samples=store.num_samples(stage),
            global_batch_size=section.global_batch_size,
        )
        hits: dict[str, list[int]] = {}
        for step, batch in enumerate(order, start=1):
            for index in batch:
                for found_id in index_to_ids.get(index, ()):
                    hits.setdefault(found_id, []).append(step)
        sightings += [Sighting(doc_id=d, stage=stage, steps=tuple(s)) for d, s in hits.items()]
    return WhereReport(query=doc_id or text or "", doc_ids=tuple(ids), sightings=tuple(sightings))


def _index_map(store: DataStore, stage: str, wanted: set[str]) -> dict[int, tuple[str, ...]]:
    if stage != "pretrain":
        return {i: (r["id"],) for i, r in enumerate(store.records(stage)) if r["id"] in wanted}
    seq_len = store.manifest.seq_len
    out: dict[int, tuple[str, ...]] = {}
    for d in store.records("pretrain_docs"):
        if d["id"] not in wanted:
            continue
        start, end = int(d["offset"]), int(d["offset"]) + int(d["length"])
        for index in range(
            start // seq_len, min((end - 1) // seq_len + 1, store.manifest.num_pretrain_seqs)
        ):
            out[index] = (*out.get(index, ()), d["id"])
    return out
