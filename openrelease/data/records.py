"""The data stage's JSONL record files: one owner for their bytes, written and read as streams.

A record is one line: the object with sorted keys, UTF-8 (not ASCII-escaped), then a newline.
`RecordWriter` writes a file record by record to a temp name beside it, fsyncs it and renames
it into place when closed without an error, so a file is whole or absent (`write_records` for
a list); `iter_records` reads one back lazily.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

from openrelease.digest import sha256_file
from openrelease.manifest import DatasetEntry


def record_line(record: dict[str, str]) -> bytes:
    """The bytes of ``record`` as one JSONL line (sorted keys, UTF-8, newline)."""
    return (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def iter_records(path: Path, *, start: int = 0) -> Iterator[dict[str, str]]:
    """The records of a file written here, from record ``start`` on, one at a time."""
    with path.open("rb") as f:
        for index, line in enumerate(f):
            if index >= start:
                record: dict[str, str] = json.loads(line)
                yield record


class RecordWriter:
    """Write records to ``path`` one by one; the file appears (renamed) on a clean close."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.num_records = 0
        self._tmp = path.with_name(f".{path.name}.tmp")
        self._file = self._tmp.open("wb")

    def write(self, record: dict[str, str]) -> None:
        """Append one record."""
        self._file.write(record_line(record))
        self.num_records += 1

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()
        if exc_type is not None:
            self._tmp.unlink(missing_ok=True)
            return
        os.replace(self._tmp, self.path)

    def entry(self) -> DatasetEntry:
        """The manifest entry of the finished file (named relative to its folder)."""
        return DatasetEntry(
            path=self.path.name,
            sha256=sha256_file(self.path),
            size=self.path.stat().st_size,
            num_records=self.num_records,
        )


def write_records(path: Path, records: Iterable[dict[str, str]]) -> DatasetEntry:
    """Write ``records`` to ``path`` (whole or absent); the file's manifest entry."""
    with RecordWriter(path) as out:
        for record in records:
            out.write(record)
    return out.entry()
