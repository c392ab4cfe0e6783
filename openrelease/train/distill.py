"""Chain-of-thought distillation: teacher traces from the data stage, a trace file, or a model.

Traces become ``prompt -> <think>reasoning</think> The answer is N.`` pairs for the SFT source;
the teacher's identity, sampling settings and the traces' sha256 are written to teacher.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from openrelease.data.records import record_line
from openrelease.data.store import DataStore
from openrelease.data.tasks import extract_answer, format_reasoning
from openrelease.digest import hash_folder, sha256_bytes, sha256_file, sha256_tree
from openrelease.errors import ArtifactError, DataError
from openrelease.manifest import read_model, write_bytes_atomic, write_json
from openrelease.params import TeacherParams
from openrelease.safeio import loads_json

logger = logging.getLogger(__name__)
TRACES_FILE = "traces.jsonl"
TEACHER_FILE = "teacher.json"


class TeacherRecord(BaseModel):
    """``artifacts/distill/teacher.json``: who wrote the traces, how, and their digest."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int = 1
    kind: str
    path: str | None
    revision: str | None
    teacher_sha256: str
    """Trace file sha256, teacher weights folder digest, or the data manifest digest."""
    sampling: dict[str, Any]
    traces_sha256: str
    num_traces: int
    num_rejected: int


def _trace_rows_from_file(path: Path, display: str) -> list[dict[str, str]]:
    rows = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = loads_json(raw, where=f"{display}:{line_no}")
            except ArtifactError:
                raise DataError(f"{display}:{line_no}: not a JSON object in UTF-8.") from None
            missing = [
                k
                for k in ("prompt", "reasoning", "answer")
                if not isinstance(row.get(k) if isinstance(row, dict) else None, str | int)
            ]
            if missing:
                raise DataError(
                    f"{display}:{line_no}: missing or non-string {', '.join(missing)};"
                    " each trace needs prompt, reasoning and answer."
                )
            rows.append({k: str(row[k]) for k in ("prompt", "reasoning", "answer")})
    if not rows:
        raise DataError(f"{display}: no traces found.")
    return rows


def _generate_traces(
    teacher: TeacherParams, store: DataStore, folder: Path
) -> tuple[list[dict[str, str]], int]:
    """Sample traces from a local transformers model, seeded; drop wrong answers if asked."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # safetensors only: a teacher folder is an input, its pytorch_model.bin a pickle
    model: Any = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    problems = store.records("distill")
    rows: list[dict[str, str]] = []
    rejected = 0
    for start in range(0, len(problems), 16):
        chunk = problems[start : start + 16]
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p["prompt"]}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for p in chunk
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(hash_seed(start))
        with torch.no_grad():
            out = model.generate(
                **batch,
                do_sample=teacher.temperature > 0,
                temperature=teacher.temperature or None,
                top_p=teacher.top_p,
                num_return_sequences=teacher.samples_per_prompt,
                max_new_tokens=teacher.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        decoded = tokenizer.batch_decode(
            out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
        for i, text in enumerate(decoded):
            problem = chunk[i // teacher.samples_per_prompt]
            got = extract_answer(text)
            if teacher.reject_incorrect and (got is None or str(got) != problem["answer"]):
                rejected += 1
                continue
            reasoning = text.split("</think>")[0].replace("<think>", "").strip() or text.strip()
            rows.append(
                {"prompt": problem["prompt"], "reasoning": reasoning, "answer": problem["answer"]}
            )
    return rows, rejected


def hash_seed(offset: int) -> int:
    """Per-chunk sampling seed: a pure function of the chunk offset."""
    return 0x5EED + offset


def prepare_traces(
    teacher: TeacherParams, *, store: DataStore, project_dir: Path, out_dir: Path
) -> TeacherRecord:
    """Write ``traces.jsonl`` and ``teacher.json`` into ``out_dir`` (reused when unchanged)."""
    sampling = teacher.model_dump(mode="json", exclude={"kind", "path", "revision"})
    existing = out_dir / TEACHER_FILE
    match teacher.kind:
        case "data":
            rows, rejected = store.records("distill"), 0
            teacher_digest = store.manifest.data_digest
        case "trace_file":
            path = project_dir / str(teacher.path)
            if not path.is_file():
                raise DataError(f"distill.teacher.path {teacher.path}: no such trace file.")
            teacher_digest = sha256_file(path)
            rows, rejected = _trace_rows_from_file(path, str(teacher.path)), 0
        case "model":
            folder = project_dir / str(teacher.path)
            if not (folder / "config.json").is_file():
                raise DataError(
                    f"distill.teacher.path {teacher.path}: not a transformers model "
                    "folder (no config.json)."
                )
            teacher_digest = sha256_tree(hash_folder(folder))
            if existing.exists():
                old = read_model(existing, TeacherRecord)
                if old.teacher_sha256 == teacher_digest and old.sampling == sampling:
                    return old
            rows, rejected = _generate_traces(teacher, store, folder)
            if not rows:
                raise DataError(
                    f"teacher {teacher.path} produced no correct trace; lower "
                    "distill.teacher.reject_incorrect or use a stronger teacher."
                )
    data = b"".join(record_line({k: r[k] for k in ("prompt", "reasoning", "answer")}) for r in rows)
    write_bytes_atomic(out_dir / TRACES_FILE, data)
    record = TeacherRecord(
        kind=teacher.kind,
        path=teacher.path,
        revision=teacher.revision,
        teacher_sha256=teacher_digest,
        sampling=sampling,
        traces_sha256=sha256_bytes(data),
        num_traces=len(rows),
        num_rejected=rejected,
    )
    write_json(existing, record)
    logger.info("distill: %d traces from %s (%d rejected)", len(rows), teacher.kind, rejected)
    return record


def distill_pairs(out_dir: Path) -> list[tuple[str, str]]:
    """(prompt, reasoning response) pairs from the prepared ``traces.jsonl``."""
    rows = [
        json.loads(line)
        for line in (out_dir / TRACES_FILE).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    return [(r["prompt"], format_reasoning(r["reasoning"], r["answer"])) for r in rows]
