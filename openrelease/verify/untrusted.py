"""Read and hash files of an untrusted release: size caps, no symlinks, strict JSON, safe paths.

Every failure is an `ArtifactError` naming the file; nothing here writes.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from openrelease.digest import PREFIX
from openrelease.manifest import validate_model
from openrelease.safeio import loads_json, read_regular

ModelT = TypeVar("ModelT", bound=BaseModel)

ProgressFn = Callable[[int, int], None]
"""Called with (bytes hashed so far, total bytes), from the hashing threads under a lock."""

MAX_JSON_BYTES = 16 << 20
"""Default cap for a small JSON record (meta.json, a probe)."""
_CHUNK = 1 << 20


def printable_name(name: str) -> str:
    """A file name as valid UTF-8 text (undecodable bytes become U+FFFD)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def unsafe_path_reason(path: str) -> str | None:
    """Why ``path`` is not a safe bundle-relative POSIX path, or None when it is."""
    if not path or "\\" in path or "\x00" in path:
        return "is empty or contains a backslash or NUL"
    if path.startswith("/") or re.match(r"[A-Za-z]:", path):
        return "is absolute"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "has an empty, '.' or '..' segment"
    return None


def read_capped(path: Path, *, max_bytes: int) -> bytes:
    """Read a regular file (never through a symlink) of at most ``max_bytes``."""
    return read_regular(path, max_bytes=max_bytes, follow_symlinks=False)


def parse_json_bytes(data: bytes, *, where: str) -> Any:
    """Decode strict UTF-8 JSON (duplicate keys refused); anything else is an `ArtifactError`."""
    return loads_json(data, where=where)


def read_model_capped(
    path: Path, model: type[ModelT], *, max_bytes: int = MAX_JSON_BYTES
) -> ModelT:
    """Read, parse and validate a small JSON record from an untrusted folder.

    Raises:
        ArtifactError: The file is a symlink, oversized, not UTF-8 JSON, or off-schema.
    """
    raw = parse_json_bytes(read_capped(path, max_bytes=max_bytes), where=str(path))
    return validate_model(raw, model, where=str(path))


def _sha256_fd(path: Path, on_bytes: Callable[[int], None]) -> str:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb", buffering=0) as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(0, "not a regular file")
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib drops the GIL for large updates
            on_bytes(n)
    return PREFIX + h.hexdigest()


def hash_files(
    root: Path,
    sizes: dict[str, int],
    *,
    progress: ProgressFn | None = None,
    num_threads: int | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """sha256 of every file in ``sizes`` (relative to ``root``) on a thread pool.

    Returns:
        ``({path: digest}, {path: error message})`` for files hashed and files unreadable.
    """
    total = sum(sizes.values())
    done = 0
    lock = threading.Lock()

    def on_bytes(n: int) -> None:
        nonlocal done
        if progress is not None:
            with lock:
                done += n
                progress(done, total)

    digests: dict[str, str] = {}
    errors: dict[str, str] = {}
    workers = max(1, num_threads or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
        # Largest first, so one big file does not start last and leave other cores idle.
        order = sorted(sizes, key=lambda p: -sizes[p])
        futures = {pool.submit(_sha256_fd, root / rel, on_bytes): rel for rel in order}
        for future in as_completed(futures):
            rel = futures[future]
            try:
                digests[rel] = future.result()
            except OSError as exc:
                errors[rel] = exc.strerror or str(exc)
    return digests, errors
