"""Importers for user data: JSONL, plain text, Parquet, local HF `datasets` folders, Hub datasets.

Each returns plain records for one role and the sha256 of what it read; bad input names file:line.
A Hub dataset (``format: hub``) is pinned to a commit and its Parquet files are checked against
the Hub's LFS sha256 before pyarrow reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openrelease.data import hub
from openrelease.digest import sha256_file, sha256_tree
from openrelease.errors import DataError
from openrelease.layout import Workspace
from openrelease.manifest import PinnedSource
from openrelease.params import ImportParams
from openrelease.safeio import no_duplicate_keys

ROLE_FIELDS: dict[str, tuple[str, ...]] = {
    "pretrain": ("text",),
    "sft": ("prompt", "response"),
    "dpo": ("prompt", "chosen", "rejected"),
    "distill": ("prompt", "reasoning", "answer"),
    "grpo": ("prompt", "answer"),
}
MAX_FIELD_CHARS = 1_000_000


@dataclass(frozen=True)
class ImportedSource:
    """Records read from one source, with the digest of the bytes they came from."""

    path: str
    sha256: str
    records: list[dict[str, str]]
    license: str | None = None
    pinned: PinnedSource | None = None


def _fields_for(spec: ImportParams) -> dict[str, str]:
    """Map the record field names of the role to the column names in the source."""
    if spec.role == "pretrain":
        return {"text": spec.fields.get("text", spec.text_field)}
    return {name: spec.fields.get(name, name) for name in ROLE_FIELDS[spec.role]}


def _to_record(row: Any, spec: ImportParams, where: str) -> dict[str, str]:
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected an object, got {type(row).__name__}; "
            "each record must be a JSON object."
        )
    record: dict[str, str] = {}
    for name, column in _fields_for(spec).items():
        value = row.get(column)
        if value is None:
            raise DataError(
                f"{where}: missing field {column!r} needed by role {spec.role}; "
                f"add it or change the import's role."
            )
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise DataError(
                f"{where}: field {column!r} must be a string, got {type(value).__name__}."
            )
        text = str(value)
        if not text.strip():
            raise DataError(f"{where}: field {column!r} is empty.")
        if len(text) > MAX_FIELD_CHARS:
            raise DataError(
                f"{where}: field {column!r} has {len(text)} characters (limit {MAX_FIELD_CHARS})."
            )
        record[name] = text
    return record


def _read_jsonl(path: Path, spec: ImportParams) -> list[dict[str, str]]:
    records = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{spec.path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(
                    f"{where}: not valid UTF-8; re-encode the file as UTF-8.",
                    path=spec.path,
                    line=line_no,
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line, object_pairs_hook=no_duplicate_keys)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{where}: invalid JSON ({exc.msg}); one object per line.",
                    path=spec.path,
                    line=line_no,
                ) from None
            except (RecursionError, ValueError) as exc:  # nested too deep; a 5000-digit number
                why = (
                    "nested too deeply" if isinstance(exc, RecursionError) else "a number too long"
                )
                raise DataError(
                    f"{where}: invalid JSON ({why}); one flat object per line.",
                    path=spec.path,
                    line=line_no,
                ) from None
            records.append(_to_record(row, spec, where))
    return records


def _read_text(path: Path, spec: ImportParams) -> list[dict[str, str]]:
    if spec.role != "pretrain":
        raise DataError(
            f"{spec.path}: text files can only feed role pretrain; "
            "use jsonl or parquet for structured records."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line_no = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{spec.path}:{line_no}: not valid UTF-8; re-encode the file as UTF-8.",
            path=spec.path,
            line=line_no,
        ) from None
    blocks = [block.strip() for block in text.replace("\r\n", "\n").split("\n\n")]
    return [{"text": block} for block in blocks if block]


def _read_table_rows(
    rows: list[dict[str, Any]], spec: ImportParams, where: str | None = None
) -> list[dict[str, str]]:
    name = where or spec.name
    return [_to_record(row, spec, f"{name}:row {i}") for i, row in enumerate(rows, start=1)]


def _read_parquet(path: Path, spec: ImportParams) -> list[dict[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(
            f"{spec.path}: not a readable Parquet file ({exc}).", path=spec.path
        ) from None
    return _read_table_rows(table.to_pylist(), spec)


def _hf_arrow_files(folder: Path, spec: ImportParams) -> list[Path]:
    state_path = folder / "state.json"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(
            f"{spec.path}: not a Hugging Face datasets folder (state.json with "
            "_data_files missing or malformed); write it with "
            "Dataset.save_to_disk().",
            path=spec.path,
        ) from None
    files = []
    for name in names:
        candidate = (folder / str(name)).resolve()
        if folder.resolve() not in candidate.parents:
            raise DataError(f"{spec.path}/state.json: data file {name!r} is outside the folder.")
        files.append(candidate)
    return files


def _read_hf_datasets(folder: Path, spec: ImportParams) -> tuple[list[dict[str, str]], str]:
    import pyarrow as pa

    if not folder.is_dir():
        raise DataError(f"{spec.path}: expected a folder written by Dataset.save_to_disk().")
    rows: list[dict[str, Any]] = []
    digests = {}
    for arrow_path in _hf_arrow_files(folder, spec):
        try:
            with pa.memory_map(str(arrow_path)) as source:
                rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(
                f"{spec.path}/{arrow_path.name}: unreadable Arrow file ({exc}).", path=spec.path
            ) from None
        digests[arrow_path.name] = sha256_file(arrow_path)
    return _read_table_rows(rows, spec), sha256_tree(digests)


def _hub_file_wanted(path: str, spec: ImportParams) -> bool:
    """Default data_files: the repo's Parquet files of ``config`` and ``split`` (if given)."""
    if not path.endswith(".parquet"):
        return False
    *folders, name = path.split("/")
    if spec.config is not None and spec.config not in folders:
        return False
    if spec.split is None:
        return True
    return spec.split in folders or name.startswith(tuple(spec.split + c for c in "-_."))


def _read_hub(spec: ImportParams, *, project_dir: Path) -> ImportedSource:
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert spec.repo is not None, "validated: format hub has a repo"
    assert spec.revision is not None, "validated: format hub has a revision"
    what = f"data.imports {spec.name}"
    snapshot = hub.resolve(
        spec.repo,
        spec.revision,
        repo_type="dataset",
        allow_floating=spec.allow_floating_revision,
        what=what,
    )
    if spec.data_files:
        files = hub.select(snapshot, spec.data_files)
    else:
        files = tuple(f for f in snapshot.files if _hub_file_wanted(f.path, spec))
    if not files:
        raise DataError(
            f"{what}@{snapshot.commit[:12]}: no Parquet file matches config {spec.config!r}, "
            f"split {spec.split!r}; set data_files (globs of repo paths)."
        )
    dest = Workspace(project_dir).hub_snapshot("dataset", snapshot.repo, snapshot.commit)
    readme = hub.select(snapshot, ("README.md",))
    entries = hub.fetch(snapshot, tuple(sorted(files, key=lambda f: f.path)), dest=dest, what=what)
    license = spec.license
    if license is None and readme:
        hub.fetch(snapshot, readme, dest=dest, what=what)
        license = hub.card_license(dest / "README.md")
    records: list[dict[str, str]] = []
    for entry in entries:
        try:
            table = pq.read_table(dest / entry.path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{what}/{entry.path}: not a readable Parquet file ({exc}).") from None
        records += _read_table_rows(table.to_pylist(), spec, where=f"hf:{spec.repo}/{entry.path}")
    pinned = hub.pin_hub(snapshot, entries, license=license)
    return ImportedSource(
        path=pinned.uri, sha256=pinned.digest, records=records, license=license, pinned=pinned
    )


def read_source(spec: ImportParams, *, project_dir: Path) -> ImportedSource:
    """Read one import into records for its role; bad input raises `DataError` with file:line."""
    if spec.format == "hub":
        source = _read_hub(spec, project_dir=project_dir)
        if not source.records:
            raise DataError(f"{spec.name}: no records found; the import would add nothing.")
        return source
    assert spec.path is not None, "validated: every format but hub has a path"
    path = (project_dir / spec.path).resolve()
    if not path.exists():
        raise DataError(
            f"{spec.path}: no such file or folder (data.imports); fix the path.", path=spec.path
        )
    if not path.is_relative_to(project_dir.resolve()):
        raise DataError(
            f"{spec.path}: resolves outside the project (a symlink?); copy the data into the "
            "project (or track it there with `dvc import-url`).",
            path=spec.path,
        )
    if spec.format == "hf_datasets":
        records, digest = _read_hf_datasets(path, spec)
    else:
        if not path.is_file():
            raise DataError(f"{spec.path}: expected a file for format {spec.format}.")
        digest = sha256_file(path)
        match spec.format:
            case "jsonl":
                records = _read_jsonl(path, spec)
            case "text":
                records = _read_text(path, spec)
            case "parquet":
                records = _read_parquet(path, spec)
    if not records:
        raise DataError(
            f"{spec.path}: no records found; the import would add nothing.", path=spec.path
        )
    return ImportedSource(path=spec.path, sha256=digest, records=records, license=spec.license)
