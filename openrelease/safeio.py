"""Reading files that may come from someone else: regular files only, capped, strict JSON.

The one place that opens an input file for reading and parses JSON. `read_regular` never blocks
on a FIFO or device (it opens non-blocking and checks the kind before reading) and checks the size
before reading a byte; `loads_json` refuses duplicate keys, NaN/Infinity and too-deep nesting,
so no two readers of the same file can disagree about what it says.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from openrelease.errors import ArtifactError, OpenReleaseError

MAX_JSON_BYTES = 16 << 20
"""Default cap for a JSON record read from disk."""


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for `json.loads`: a duplicate key is a ValueError, not last-wins."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads_json(text: str | bytes, *, where: str) -> Any:
    """Parse JSON strictly: duplicate keys, NaN/Infinity, bad UTF-8 or deep nesting refused.

    Raises:
        ArtifactError: Naming ``where`` and what is wrong.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=no_duplicate_keys, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ArtifactError(f"{where} is not valid UTF-8.", path=where) from None
    except RecursionError:
        raise ArtifactError(f"{where} is JSON nested too deeply to read.", path=where) from None
    except ValueError as exc:  # JSONDecodeError is a ValueError; so is a duplicate key
        raise ArtifactError(f"{where} is not valid JSON ({exc}).", path=where) from None


def read_regular(
    path: Path,
    *,
    max_bytes: int,
    follow_symlinks: bool = True,
    error: type[OpenReleaseError] = ArtifactError,
    what: str = "",
    fix: str = "pass a file",
) -> bytes:
    """The bytes of the regular file ``path``, refused before reading when over ``max_bytes``.

    Opened with O_NONBLOCK (a FIFO never blocks) and, unless ``follow_symlinks``, O_NOFOLLOW;
    a folder, FIFO, socket or device is refused from ``fstat`` before any read.

    Raises:
        OpenReleaseError: ``error`` naming ``path`` (missing, not a regular file, too big).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    label = f"{what} {path}".strip()
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{label} cannot be opened: it does not exist.") from None
    except OSError as exc:
        if not follow_symlinks and Path(path).is_symlink():
            raise error(
                f"{label} cannot be opened: it is a symlink, and only regular files are read."
            ) from None
        raise error(f"{label} cannot be opened ({exc.strerror}).") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise error(f"{label} is a folder; {fix}.")
        raise error(f"{label} is not a regular file (a FIFO, socket or device).")
    if info.st_size > max_bytes:
        os.close(fd)
        raise error(f"{label} is {info.st_size} bytes, above the {max_bytes}-byte limit.")
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{label} grew above the {max_bytes}-byte limit while being read.")
    return data


def read_json_file(
    path: Path, *, max_bytes: int = MAX_JSON_BYTES, follow_symlinks: bool = True
) -> Any:
    """`read_regular` then `loads_json`.

    Raises:
        ArtifactError: The file is missing, not regular, too big or not strict JSON.
    """
    data = read_regular(path, max_bytes=max_bytes, follow_symlinks=follow_symlinks)
    return loads_json(data, where=str(path))
