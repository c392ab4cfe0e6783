"""The data card: Croissant 1.0 JSON-LD for a release's datasets, and the data order record.

Built from the data stage's manifest (reading only each JSONL file's first line for its fields);
the bundle writes what these functions return into data/.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData

from openrelease.digest import bare_hex
from openrelease.errors import ArtifactError
from openrelease.manifest import CheckpointMeta, DataManifest, SourceEntry

CONFORMS_TO = "http://mlcommons.org/croissant/1.0"
MAX_RECORD_CHARS = 16 << 20
"""The first record of a JSONL file is read (for its fields) up to this many characters."""
CONTEXT: dict[str, Any] = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/",
    "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract",
    "field": "cr:field",
    "fileProperty": "cr:fileProperty",
    "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "parentField": "cr:parentField",
    "path": "cr:path",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "samplingRate": "cr:samplingRate",
    "sc": "https://schema.org/",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
}
"""The standard Croissant ``@context`` (the keys mlcroissant 1.1 expects for 1.0 documents)."""
ENCODINGS = {
    ".jsonl": "application/jsonlines",
    ".json": "application/json",
    ".npy": "application/x-npy",
    ".jinja": "text/plain",
    ".txt": "text/plain",
}
HF_LICENSE_IDS = {
    "Apache-2.0": "apache-2.0",
    "MIT": "mit",
    "CC-BY-4.0": "cc-by-4.0",
    "CC-BY-SA-4.0": "cc-by-sa-4.0",
    "CC0-1.0": "cc0-1.0",
    "CDLA-Permissive-1.0": "cdla-permissive-1.0",
    "CDLA-Permissive-2.0": "cdla-permissive-2.0",
    "CDLA-Sharing-1.0": "cdla-sharing-1.0",
    "ODC-By-1.0": "odc-by",
    "ODbL-1.0": "odbl",
    "PDDL-1.0": "pddl",
}
"""SPDX id -> Hub license id, for the data licenses the Hub knows."""
ROLE_DESCRIPTIONS = {
    "pretrain_docs": "Pretraining documents (before tokenization and packing).",
    "sft": "Instruction-tuning chat pairs (prompt, response).",
    "dpo": "Preference pairs for DPO (prompt, chosen, rejected).",
    "distill": "Chain-of-thought traces for distillation (prompt, reasoning, answer).",
    "grpo": "Prompts with verifiable answers for GRPO reinforcement learning.",
    "eval_text": "Held-out documents for the held-out loss (never trained on).",
    "eval_problems": "Held-out problems with reference answers (never trained on).",
    "eval_dpo": "Held-out preference pairs for the preference accuracy (never trained on).",
}


@dataclass(frozen=True)
class DataFile:
    """One file of the released data, as the card lists it."""

    path: str
    """POSIX path relative to the card's folder; also the FileObject's ``@id``."""
    sha256: str
    """``sha256:<hex>`` digest."""
    size: int
    fields: tuple[str, ...] = ()
    """JSONL keys; a non-empty tuple gives the file a RecordSet with one text field per key."""
    description: str = ""
    url: str | None = None
    """Where the file is when it is not shipped beside the card (a pointer); None: shipped."""


def _encoding(path: str) -> str:
    suffix = "." + path.rsplit(".", 1)[-1] if "." in path else ""
    return ENCODINGS.get(suffix, "application/octet-stream")


def _file_object(f: DataFile) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "@type": "cr:FileObject",
        "@id": f.path,
        "name": f.path,
        "contentUrl": f.url or f.path,
        "contentSize": f"{f.size} B",
        "encodingFormat": _encoding(f.path),
        "sha256": bare_hex(f.sha256),
    }
    if f.description:
        obj["description"] = f.description
    return obj


def _record_set(f: DataFile) -> dict[str, Any]:
    name = f.path.rsplit("/", 1)[-1].split(".", 1)[0]
    return {
        "@type": "cr:RecordSet",
        "@id": name,
        "name": name,
        "description": f.description or f"Records of {f.path}.",
        "field": [
            {
                "@type": "cr:Field",
                "@id": f"{name}/{key}",
                "name": key,
                "description": f"The {key!r} value of each record.",
                "dataType": "sc:Text",
                "source": {"fileObject": {"@id": f.path}, "extract": {"column": key}},
            }
            for key in f.fields
        ],
    }


def croissant_card(
    *,
    name: str,
    description: str,
    organization: str,
    license_id: str,
    url: str,
    date: str,
    files: Sequence[DataFile],
) -> dict[str, Any]:
    """A Croissant 1.0 dataset description (JSON-LD) of ``files``.

    Args:
        name: Dataset name (letters, digits, ``-``, ``_`` and ``.``).
        description: One paragraph on what the data is.
        organization: The creator.
        license_id: SPDX id; written as its spdx.org URL.
        url: Where the dataset lives (e.g. its Hub dataset repo).
        date: ``YYYY-MM-DD`` publication date.
        files: Every file, with its digest; JSONL files with ``fields`` get a RecordSet.

    Returns:
        The JSON-LD document as a dict (write it with `manifest.dump_json`).
    """
    return {
        "@context": CONTEXT,
        "@type": "sc:Dataset",
        "name": name,
        "description": description,
        "conformsTo": CONFORMS_TO,
        "citeAs": f"{organization}. {name} ({date[:4]}). {url}",
        "creator": {"@type": "sc:Organization", "name": organization},
        "datePublished": date,
        "license": f"https://spdx.org/licenses/{license_id}.html",
        "url": url,
        "version": "1.0.0",
        "distribution": [_file_object(f) for f in files],
        "recordSet": [_record_set(f) for f in files if f.fields],
    }


EVAL_ROLE_PREFIX = "eval"


def dataset_card(
    *,
    name: str,
    description: str,
    license_id: str,
    model_repo_id: str,
    roles: Mapping[str, str],
) -> str:
    """README.md of the dataset repo: a `huggingface_hub.DatasetCard` whose ``configs:`` let
    ``datasets.load_dataset(repo, "<role>")`` load each role.

    Each role's JSONL files have their own fields, so one config per role; each file is a
    split (``train`` for training roles, ``test`` for the held-out eval sets).

    Args:
        name: Dataset name.
        description: One paragraph on what the data is.
        license_id: SPDX id (``other`` with the id in ``license_name`` when the Hub lacks it).
        model_repo_id: The model trained on it.
        roles: ``{role: path in the dataset repo}`` of each shipped JSONL file.
    """
    hub_license = HF_LICENSE_IDS.get(license_id)
    configs = [
        {
            "config_name": role,
            "data_files": [
                {"split": "test" if role.startswith(EVAL_ROLE_PREFIX) else "train", "path": path}
            ],
        }
        for role, path in sorted(roles.items())
    ]
    data = DatasetCardData(
        license=hub_license or "other",
        license_name=None if hub_license else license_id.lower(),
        pretty_name=name,
        language=["en"],
        configs=configs,
        tags=["openrelease", "croissant"],
    )
    rows = [f"| `{role}` | `{path}` | {ROLE_DESCRIPTIONS.get(role, '')} |" for role, path in sorted(roles.items())]
    first = sorted(roles)[0] if roles else "sft"
    body = "\n".join(
        [
            f"# {name}",
            "",
            description,
            "",
            f"The data of [{model_repo_id}](https://huggingface.co/{model_repo_id}); "
            "`croissant.json` beside this card describes every file (Croissant 1.0) with its "
            "sha256, and `data/manifest.json` is the data stage's record.",
            "",
            "## Configs",
            "",
            "| config | file | what |",
            "| --- | --- | --- |",
            *rows,
            "",
            "```python",
            "from datasets import load_dataset",
            f'ds = load_dataset("{model_repo_id}-data", "{first}")',
            "```",
            "",
        ]
    )
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _jsonl_fields(path: Path) -> tuple[str, ...]:
    try:
        with path.open(encoding="utf-8") as f:
            row = json.loads(f.readline(MAX_RECORD_CHARS))
    except (json.JSONDecodeError, UnicodeDecodeError):
        row = None
    if not isinstance(row, dict):
        raise ArtifactError(
            f"{path}: the first line is not a JSON object; run `dvc repro -f data`.",
            path=str(path),
        )
    return tuple(sorted(str(k) for k in row))


def release_data_files(
    manifest: DataManifest, data_dir: Path, *, include_data: bool, repo_url: str
) -> list[DataFile]:
    """Every non-empty data file, with its JSONL fields.

    Training data become pointers into ``repo_url`` unless ``include_data``; eval sets always
    ship (they are small, and MOF's Evaluation data needs them).
    """
    entries = [(role, e.path, e.sha256, e.size) for role, e in sorted(manifest.datasets.items())]
    entries += [("", s.path, s.sha256, s.size) for s in manifest.shards]
    files = []
    for role, path, digest, size in entries:
        if size == 0:
            continue  # an empty dataset (e.g. no distill records) is not released
        shipped = include_data or role.startswith("eval")
        url = None if shipped else f"{repo_url}/resolve/main/{path}"
        fields = _jsonl_fields(data_dir / path) if path.endswith(".jsonl") else ()
        desc = ROLE_DESCRIPTIONS.get(role, "Packed pretraining token ids (int32 numpy array).")
        files.append(DataFile(path, digest, size, fields, desc, url))
    return files


def data_description(manifest: DataManifest) -> str:
    """A one-paragraph summary of the data stage's output, from its manifest."""
    sources = ", ".join(_source_phrase(s) for s in manifest.sources)
    tok = manifest.tokenizer_source
    tokenizer = (
        f"byte-level BPE vocabulary of {manifest.vocab_size}"
        if tok is None
        else f"the {manifest.vocab_size}-token tokenizer of {tok.uri}"
    )
    return (
        f"Generated and imported by the openrelease data stage (seed {manifest.seed}) from: "
        f"{sources}. {manifest.num_pretrain_tokens} pretraining tokens packed into "
        f"{manifest.num_pretrain_seqs} sequences of {manifest.seq_len} tokens, "
        f"{tokenizer}; data digest {manifest.data_digest}."
    )


def _source_phrase(source: SourceEntry) -> str:
    """``name (kind, N records[, license L][, commit C])``: one source of the data card."""
    extra = [f"license {source.license}"] if source.license else []
    if source.pinned is not None and source.pinned.commit is not None:
        extra.append(f"commit {source.pinned.commit}")
    details = ", ".join([source.kind, f"{source.num_records} records", *extra])
    return f"{source.name} ({details})"


def stage_num_samples(manifest: DataManifest, stage: str) -> int:
    """Samples the data order of ``stage`` permutes (packed sequences, or records)."""
    if stage == "pretrain":
        return manifest.num_pretrain_seqs
    entry = manifest.datasets.get(stage)
    return entry.num_records if entry is not None else 0


def data_order(
    manifest: DataManifest,
    *,
    seed: int,
    checkpoints: Mapping[str, Sequence[CheckpointMeta]],
    batch_sizes: Mapping[str, int],
) -> dict[str, Any]:
    """Which samples each checkpoint consumed: sample ranges and their order digests.

    The order is a pure function of (seed, data digest, stage, step); the digests let anyone
    recompute it (`openrelease data batch`) and check it against the released checkpoints.
    """
    return {
        "schema_version": 1,
        "seed": seed,
        "data_digest": manifest.data_digest,
        "algorithm": manifest.order_algorithm,
        "recompute": "openrelease data batch --stage <stage> --step <step>",
        "stages": {
            stage: {
                "num_samples": stage_num_samples(manifest, stage),
                "global_batch_size": batch_sizes[stage],
                "checkpoints": [
                    {
                        "step": m.step,
                        "sample_range": list(m.sample_range),
                        "order_digest": m.data_digest,
                        "tokens_seen": m.tokens_seen,
                        "checkpoint_digest": m.checkpoint_digest,
                    }
                    for m in metas
                ],
            }
            for stage, metas in checkpoints.items()
        },
    }
