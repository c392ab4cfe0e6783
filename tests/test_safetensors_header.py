from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from openrelease.errors import ArtifactError
from openrelease.verify.safetensors_header import read_safetensors_header


def _raw(path: Path, header: bytes, data: bytes = b"", *, claimed: int | None = None) -> Path:
    length = len(header) if claimed is None else claimed
    path.write_bytes(struct.pack("<Q", length) + header + data)
    return path


def _file(path: Path, header: Any, data: bytes = b"") -> Path:
    return _raw(path, json.dumps(header).encode(), data)


def test_reads_a_real_file_without_loading_tensors(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tensors = {
        "a": np.zeros((3, 4), dtype=np.float32),
        "b": np.ones(5, dtype=np.float16),
        "empty": np.zeros((0, 7), dtype=np.int64),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    summary = read_safetensors_header(path)
    by_name = {t.name: t for t in summary.tensors}
    assert by_name["a"].dtype == "F32"
    assert by_name["a"].shape == (3, 4)
    assert by_name["a"].nbytes == 48
    assert by_name["b"].nbytes == 10
    assert by_name["empty"].nbytes == 0
    assert summary.metadata == {"format": "pt"}
    assert summary.num_params == 17
    assert summary.data_size == 58
    assert 8 + summary.header_size + summary.data_size == path.stat().st_size


GOOD = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    ("header", "data", "fragment"),
    [
        ([1, 2], b"", "not an object"),
        ({"t": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "unknown dtype"),
        ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "non-negative"),
        (
            {"t": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
            bytes(4),
            "non-negative",
        ),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}}, bytes(8), "outside"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4), "span 4 bytes"),
        ({"t": {"dtype": "F32", "shape": [2]}}, bytes(8), "exactly dtype"),
        (GOOD, bytes(12), "cover 8 bytes but the data region has 12"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
            "overlaps",
        ),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), "gap"),
        ({**GOOD, "__metadata__": {"k": 1}}, bytes(8), "__metadata__"),
        ({"t": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, bytes(2), "1.5 bytes"),
    ],
)
def test_lying_headers_are_refused(tmp_path: Path, header: Any, data: bytes, fragment: str) -> None:
    path = _file(tmp_path / "x.safetensors", header, data)
    with pytest.raises(ArtifactError, match="not a valid safetensors") as info:
        read_safetensors_header(path)
    assert fragment in str(info.value)


def test_header_longer_than_file(tmp_path: Path) -> None:
    path = _raw(tmp_path / "x.safetensors", b"{}", claimed=1000)
    with pytest.raises(ArtifactError, match="claims 1000 bytes but the file has 10"):
        read_safetensors_header(path)


def test_multi_gb_header_is_refused_without_reading(tmp_path: Path) -> None:
    path = _raw(tmp_path / "x.safetensors", b"{}", claimed=5 << 30)
    with pytest.raises(ArtifactError, match="above the 100 MB limit"):
        read_safetensors_header(path)


def test_short_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ArtifactError, match="too short"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (b"\xff\xfe{}", "UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a": {}, "a": {}}', "duplicate key"),
    ],
)
def test_bad_json_headers(tmp_path: Path, header: bytes, fragment: str) -> None:
    path = _raw(tmp_path / "x.safetensors", header)
    with pytest.raises(ArtifactError, match=fragment):
        read_safetensors_header(path)


def test_empty_file_set_is_valid(tmp_path: Path) -> None:
    path = _file(tmp_path / "x.safetensors", {})
    assert read_safetensors_header(path).tensors == ()


def test_symlink_is_not_followed(tmp_path: Path) -> None:
    real = tmp_path / "real.safetensors"
    save_file({"a": np.zeros(2, dtype=np.float32)}, str(real))
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    with pytest.raises(ArtifactError, match="cannot be opened"):
        read_safetensors_header(link)
