"""Importers for user data: JSONL, plain text, Parquet, local HF `datasets` folders, Hub datasets.

Each gives plain records for one role and the sha256 of what it read; bad input names file:line.
`open_source` checks an import and reads its records lazily, a batch at a time (no import ever
sits in memory whole). A Hub dataset (``format: hub``) is pinned to a commit and its Parquet
files are checked against the Hub's LFS sha256 before pyarrow reads them.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
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
READ_CHUNK_BYTES = 1 << 20
"""Bytes of a text file decoded at a time."""
TABLE_BATCH_ROWS = 1024
"""Rows of a Parquet file converted to records at a time."""


@dataclass
class SourceStream:
    """One import, opened and checked; iterating it reads its records lazily, once.

    ``num_records`` is final after the iteration, and so is ``sha256``: a datasets folder hashes
    each Arrow file after reading it (as it always has); the other formats are hashed on opening.
    """

    spec: ImportParams
    path: str
    rows: Iterator[dict[str, str]]
    sha256: str = ""
    license: str | None = None
    pinned: PinnedSource | None = None
    num_records: int = 0
    arrow_digests: dict[str, str] | None = None
    """A datasets folder: the digest of each Arrow file read so far."""

    def __iter__(self) -> Iterator[dict[str, str]]:
        for record in self.rows:
            self.num_records += 1
            yield record
        if self.arrow_digests is not None:
            self.sha256 = sha256_tree(self.arrow_digests)
        if not self.num_records:
            if self.spec.format == "hub":
                raise DataError(
                    f"{self.spec.name}: no records found; the import would add nothing."
                )
            raise DataError(
                f"{self.spec.path}: no records found; the import would add nothing.",
                path=self.spec.path,
            )


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


def _read_jsonl(path: Path, spec: ImportParams) -> Iterator[dict[str, str]]:
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
            yield _to_record(row, spec, where)


def _read_text(path: Path, spec: ImportParams) -> Iterator[dict[str, str]]:
    r"""Blank-line-separated blocks, stripped: ``text.replace("\r\n", "\n").split("\n\n")``.

    Decoded and split a chunk at a time: a ``\r`` ending a chunk waits for the next one (it may
    start a ``\r\n``), and the text after the last blank line so far waits for more.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending, held_cr, newlines = "", "", 0
    with path.open("rb") as f:
        while True:
            raw = f.read(READ_CHUNK_BYTES)
            buffered = decoder.getstate()[0]
            try:
                text = held_cr + decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:
                line_no = newlines + (buffered + raw)[: exc.start].count(b"\n") + 1
                raise DataError(
                    f"{spec.path}:{line_no}: not valid UTF-8; re-encode the file as UTF-8.",
                    path=spec.path,
                    line=line_no,
                ) from None
            newlines += raw.count(b"\n")
            held_cr = "\r" if raw and text.endswith("\r") else ""
            pending += text[: len(text) - len(held_cr)].replace("\r\n", "\n")
            *blocks, pending = pending.split("\n\n")
            if not raw:
                blocks.append(pending)
            for block in blocks:
                if block := block.strip():
                    yield {"text": block}
            if not raw:
                return


def _table_records(
    batches: Iterable[list[dict[str, Any]]], spec: ImportParams, where: str | None = None
) -> Iterator[dict[str, str]]:
    """Records of table rows given a batch at a time; rows are numbered from 1 across batches."""
    name = where or spec.name
    row_no = 0
    for rows in batches:
        for row in rows:
            row_no += 1
            yield _to_record(row, spec, f"{name}:row {row_no}")


def _parquet_batches(
    file: Path, what: str, *, error_path: str | None = None
) -> Iterator[list[dict[str, Any]]]:
    """The rows of a Parquet file, ``TABLE_BATCH_ROWS`` at a time (a row group is read whole)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(file) as parquet:
            for batch in parquet.iter_batches(batch_size=TABLE_BATCH_ROWS):
                yield batch.to_pylist()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{what}: not a readable Parquet file ({exc}).", path=error_path) from None


def _read_parquet(path: Path, spec: ImportParams) -> Iterator[dict[str, str]]:
    assert spec.path is not None, "validated: format parquet has a path"
    return _table_records(_parquet_batches(path, spec.path, error_path=spec.path), spec)


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


def _arrow_batches(
    files: list[Path], spec: ImportParams, digests: dict[str, str]
) -> Iterator[list[dict[str, Any]]]:
    """The rows of each Arrow stream file, a record batch at a time; each hashed once read."""
    import pyarrow as pa

    for arrow_path in files:
        try:
            with pa.memory_map(str(arrow_path)) as source:
                for batch in pa.ipc.open_stream(source):
                    yield batch.to_pylist()
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(
                f"{spec.path}/{arrow_path.name}: unreadable Arrow file ({exc}).", path=spec.path
            ) from None
        digests[arrow_path.name] = sha256_file(arrow_path)


def _open_hf_datasets(folder: Path, spec: ImportParams) -> SourceStream:
    if not folder.is_dir():
        raise DataError(f"{spec.path}: expected a folder written by Dataset.save_to_disk().")
    assert spec.path is not None, "validated: format hf_datasets has a path"
    files = _hf_arrow_files(folder, spec)
    digests: dict[str, str] = {}
    rows = _table_records(_arrow_batches(files, spec, digests), spec)
    return SourceStream(
        spec=spec, path=spec.path, rows=rows, license=spec.license, arrow_digests=digests
    )


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


def _open_hub(spec: ImportParams, *, project_dir: Path) -> SourceStream:
    """Pin the repo, fetch and check its files; their rows are read when the stream is."""
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
    pinned = hub.pin_hub(snapshot, entries, license=license)
    rows = (
        record
        for entry in entries
        for record in _table_records(
            _parquet_batches(dest / entry.path, f"{what}/{entry.path}"),
            spec,
            where=f"hf:{spec.repo}/{entry.path}",
        )
    )
    return SourceStream(
        spec=spec, path=pinned.uri, rows=rows, sha256=pinned.digest, license=license, pinned=pinned
    )


def open_source(spec: ImportParams, *, project_dir: Path) -> SourceStream:
    """Check one import and open it; iterating the stream reads its records, lazily, once.

    Bad input raises `DataError` with file:line: what can be checked without reading the
    records (the path, a datasets folder's state.json, a Hub pin) on opening, the rest when
    the records are read.
    """
    if spec.format == "hub":
        return _open_hub(spec, project_dir=project_dir)
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
        return _open_hf_datasets(path, spec)
    if not path.is_file():
        raise DataError(f"{spec.path}: expected a file for format {spec.format}.")
    if spec.format == "text" and spec.role != "pretrain":
        raise DataError(
            f"{spec.path}: text files can only feed role pretrain; "
            "use jsonl or parquet for structured records."
        )
    digest = sha256_file(path)
    match spec.format:
        case "jsonl":
            rows = _read_jsonl(path, spec)
        case "text":
            rows = _read_text(path, spec)
        case "parquet":
            rows = _read_parquet(path, spec)
    return SourceStream(spec=spec, path=spec.path, rows=rows, sha256=digest, license=spec.license)
