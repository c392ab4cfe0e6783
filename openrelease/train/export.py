"""`openrelease data export`: the exact token sequences a stage trained on between two steps.

For every sample of steps A..B (in training order) it writes the token ids and labels the
trainer's batch source gives that sample (the same `BatchSource` classes the stage trains
with), the sample's index, document ids and sources. ``export.json`` holds the order digest of
the exported sample ids, which equals `data batch`'s for a single step and a checkpoint's
``data_digest`` (meta.json) when A..B is the stretch that checkpoint trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from transformers import AutoTokenizer

from openrelease.data.order import check_algorithm, order_digest, positions_batch
from openrelease.data.query import provenance
from openrelease.data.store import DataStore
from openrelease.digest import sha256_file
from openrelease.errors import ArtifactError, DataError
from openrelease.layout import Workspace
from openrelease.manifest import write_json
from openrelease.params import GRPOParams, PipelineParams, StageName
from openrelease.train.distill import TRACES_FILE, distill_pairs
from openrelease.train.dpo import PairSource
from openrelease.train.grpo import PromptSource
from openrelease.train.job import BatchSource
from openrelease.train.pretrain import PackedSource
from openrelease.train.sft import ChatSource, sft_pairs

SAMPLES_FILE = "samples.jsonl"
EXPORT_FILE = "export.json"


class ExportReport(BaseModel):
    """``export.json``: what the export holds and the digests that tie it to the run."""

    model_config = ConfigDict(frozen=True)
    schema_version: int = 1
    stage: str
    from_step: int
    to_step: int
    global_batch_size: int
    num_samples: int
    data_digest: str
    order_algorithm: str
    order_digest: str
    """sha256 of the exported sample ids (int64 LE), as `data batch` and meta.json give it."""
    tokens_digest: str
    """sha256 over every exported sequence's input ids (int64 LE), each prefixed by its length
    (a preference pair: chosen, then rejected)."""
    samples_sha256: str
    """sha256 of samples.jsonl."""
    num_tokens: int


def _source(
    stage: StageName, params: PipelineParams, store: DataStore, project_dir: Path
) -> BatchSource:
    """The batch source the stage trains with, by its kind (distill: its prepared traces)."""
    kind = params.spec(stage).kind
    if kind == "pretrain":
        return PackedSource(store)
    tokenizer = AutoTokenizer.from_pretrained(str(store.tokenizer_dir))
    seq_len = params.stage(stage).seq_len
    if kind == "sft":
        return ChatSource(sft_pairs(store.records("sft")), tokenizer=tokenizer, seq_len=seq_len)
    if kind == "dpo":
        return PairSource(store.records("dpo"), tokenizer=tokenizer, seq_len=seq_len)
    if kind == "distill":
        out_dir = Workspace(project_dir).stage_dir(stage)
        if not (out_dir / TRACES_FILE).is_file():
            raise ArtifactError(
                f"{out_dir / TRACES_FILE} is missing: the {stage} stage writes its traces when "
                f"it starts; run `dvc repro {stage}` first."
            )
        return ChatSource(distill_pairs(out_dir), tokenizer=tokenizer, seq_len=seq_len)
    p = params.stage(stage)
    assert isinstance(p, GRPOParams), f"{stage} is a grpo stage"
    return PromptSource(
        store.records("grpo"), tokenizer=tokenizer, max_prompt_len=p.seq_len - p.max_new_tokens
    )


def export_steps(
    params: PipelineParams,
    *,
    project_dir: Path,
    stage: StageName,
    from_step: int,
    to_step: int,
    out_dir: Path,
) -> ExportReport:
    """Write the samples of steps ``from_step..to_step`` of ``stage`` to ``out_dir``.

    The folder is built beside ``out_dir`` and renamed into place.

    Raises:
        DataError: The steps are outside the stage's run, or ``out_dir`` already exists.
    """
    num_steps = params.stage(stage).num_steps
    if not 1 <= from_step <= to_step <= num_steps:
        raise DataError(
            f"steps {from_step}..{to_step} are not inside stage {stage}'s 1..{num_steps}; "
            "give 1 <= --from-step <= --to-step <= num_steps."
        )
    if out_dir.exists():
        raise DataError(f"{out_dir} already exists; remove it or pick another --out.")
    store = DataStore(Workspace(project_dir).data(params.data.out_dir))
    check_algorithm(store.manifest.order_algorithm, where=str(store.data_dir))
    source = _source(stage, params, store, project_dir)
    kind = params.spec(stage).kind
    gbs = params.stage(stage).global_batch_size
    start = (from_step - 1) * gbs
    ids = positions_batch(
        seed=params.seed,
        data_digest=store.manifest.data_digest,
        stage=stage,
        start=start,
        count=(to_step - from_step + 1) * gbs,
        num_samples=source.num_samples,
    )
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokens = hashlib.sha256()
    num_tokens = 0
    try:
        with (tmp / SAMPLES_FILE).open("w", encoding="utf-8") as f:
            for offset, index in enumerate(ids.tolist()):
                (batch,) = source.micro_batches([index], micro_batch_size=1)
                doc_ids, sources = provenance(store, kind, index)
                row: dict[str, object] = {
                    "step": (start + offset) // gbs + 1,
                    "position": start + offset,
                    "index": index,
                    "doc_ids": doc_ids,
                    "sources": sources,
                }
                # One sequence per sample; a preference pair is two: chosen, then rejected.
                for name, i in zip(
                    ("", "rejected_"), range(batch.input_ids.shape[0]), strict=False
                ):
                    input_ids = batch.input_ids[i].tolist()
                    row[f"{name}input_ids"] = input_ids
                    row[f"{name}labels"] = batch.labels[i].tolist()
                    tokens.update(len(input_ids).to_bytes(8, "little"))
                    tokens.update(b"".join(t.to_bytes(8, "little", signed=True) for t in input_ids))
                    num_tokens += len(input_ids)
                f.write(json.dumps(row, sort_keys=True) + "\n")
        report = ExportReport(
            stage=stage,
            from_step=from_step,
            to_step=to_step,
            global_batch_size=gbs,
            num_samples=len(ids),
            data_digest=store.manifest.data_digest,
            order_algorithm=store.manifest.order_algorithm,
            order_digest=order_digest(ids),
            tokens_digest="sha256:" + tokens.hexdigest(),
            samples_sha256=sha256_file(tmp / SAMPLES_FILE),
            num_tokens=num_tokens,
        )
        write_json(tmp / EXPORT_FILE, report)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
