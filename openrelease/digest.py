"""sha256 of bytes, files, folders and canonical JSON: the one hashing routine everyone uses.

Digests are written as ``sha256:<hex>``; a file's bare hex equals its Hugging Face LFS oid.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

PREFIX = "sha256:"
_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    """Return the ``sha256:<hex>`` digest of ``data``."""
    return PREFIX + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Return the ``sha256:<hex>`` digest of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return PREFIX + h.hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Serialise ``obj`` as canonical JSON: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def sha256_json(obj: Any) -> str:
    """Return the digest of ``obj``'s canonical JSON form."""
    return sha256_bytes(canonical_json(obj))


def sha256_tree(files: dict[str, str]) -> str:
    """Digest of a folder given ``{relative posix path: file digest}``; order-independent."""
    return sha256_json(sorted(files.items()))


def hash_folder(root: Path) -> dict[str, str]:
    """Return ``{relative posix path: digest}`` for every regular file under ``root``."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def bare_hex(digest: str) -> str:
    """Strip the ``sha256:`` prefix (e.g. to compare with a Hub LFS oid)."""
    return digest.removeprefix(PREFIX)
