"""Parse and check a safetensors header without loading any tensor data.

Owns the format rules (dtypes, offsets, sizes); callers decide what a bad header means.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from openrelease.errors import ArtifactError

MAX_HEADER_BYTES = 100_000_000
"""The safetensors reference implementation refuses headers above 100 MB; so do we."""

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "I64": 64,
    "U64": 64,
    "F64": 64,
}


class TensorInfo(BaseModel):
    """One tensor as the header describes it."""

    model_config = ConfigDict(frozen=True)

    name: str
    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]
    """[begin, end) relative to the start of the data region."""

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.data_offsets[1] - self.data_offsets[0]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


class SafetensorsSummary(BaseModel):
    """What a valid safetensors header says about its file."""

    model_config = ConfigDict(frozen=True)

    header_size: int
    data_size: int
    metadata: dict[str, str]
    tensors: tuple[TensorInfo, ...]

    @property
    def num_params(self) -> int:
        """Total number of elements over all tensors."""
        return sum(t.numel for t in self.tensors)


def _fail(path: Path, why: str) -> ArtifactError:
    return ArtifactError(
        f"{path} is not a valid safetensors file: {why}; re-export it with safetensors.",
        path=str(path),
    )


def _read_header(path: Path) -> tuple[bytes, int]:
    """Return the raw header bytes and the file size; follows no symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ArtifactError(f"{path} cannot be opened ({exc.strerror}).", path=str(path)) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _fail(path, "not a regular file")
        file_size = info.st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _fail(path, f"{file_size} bytes is too short for the 8-byte header length")
        header_size = int.from_bytes(prefix, "little")
        if header_size > MAX_HEADER_BYTES:
            raise _fail(path, f"header claims {header_size} bytes, above the 100 MB limit")
        if 8 + header_size > file_size:
            raise _fail(path, f"header claims {header_size} bytes but the file has {file_size}")
        raw = f.read(header_size)
    if len(raw) != header_size:
        raise _fail(path, "file shrank while reading the header")
    return raw, file_size


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_json(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise _fail(path, "header is not valid UTF-8") from None
    except RecursionError:
        raise _fail(path, "header JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError; so is a duplicate key
        raise _fail(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail(path, "header JSON is not an object")
    return header


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor(path: Path, name: str, entry: Any, *, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _fail(path, f"tensor {name!r} needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _fail(path, f"tensor {name!r} has unknown dtype {str(dtype)[:40]!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _fail(path, f"tensor {name!r} shape must be a list of non-negative ints")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise _fail(path, f"tensor {name!r} data_offsets lie outside the {data_size}-byte data")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        raise _fail(
            path,
            f"tensor {name!r} is {dtype}{shape} ({bits / 8:g} bytes) "
            f"but its data_offsets span {offsets[1] - offsets[0]} bytes",
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), data_offsets=tuple(offsets))


def _check_layout(path: Path, tensors: list[TensorInfo], *, data_size: int) -> None:
    """Tensors must tile the data region exactly: no gap, no overlap, no trailing bytes."""
    end = 0
    for t in sorted(tensors, key=lambda t: t.data_offsets):
        if t.data_offsets[0] != end:
            how = "overlaps" if t.data_offsets[0] < end else "leaves a gap before"
            raise _fail(path, f"tensor {t.name!r} {how} the previous tensor's data")
        end = t.data_offsets[1]
    if end != data_size:
        raise _fail(path, f"tensors cover {end} bytes but the data region has {data_size}")


def read_safetensors_header(path: Path) -> SafetensorsSummary:
    """Read and check the header of the safetensors file at ``path``; loads no tensor data.

    Args:
        path: The ``.safetensors`` file; symlinks are refused.

    Returns:
        The parsed header: sizes, ``__metadata__`` and every tensor's dtype, shape and offsets.

    Raises:
        ArtifactError: The file is unreadable or its header breaks the safetensors format
            (size, JSON, dtype, shape, offsets, layout).
    """
    raw, file_size = _read_header(path)
    header = _parse_json(path, raw)
    data_size = file_size - 8 - len(raw)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    tensors = [_tensor(path, name, entry, data_size=data_size) for name, entry in header.items()]
    _check_layout(path, tensors, data_size=data_size)
    return SafetensorsSummary(
        header_size=len(raw), data_size=data_size, metadata=metadata, tensors=tuple(tensors)
    )
