"""JSONL records: `FieldSplicer` gives `record_line`'s bytes; `iter_lines` reads them back."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from openrelease.data.records import FieldSplicer, iter_lines, iter_records, record_line

# Characters that JSON escapes or that look like the structure the splicer searches for.
ALPHABET = ['"', "\\", ",", ":", " ", "{", "}", "\n", "\t", "\x00", "é", "字", "😀", "a", "z", "_"]
KEYS = ["a", "id", "len", "length", "lengthy", "offset", "offset2", "p", "source", "text", "zz"]


def _string(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(n)))


@pytest.mark.parametrize("new", [("offset", "length"), ("length",), ("zzz", "zzzz"), ("", "0")])
def test_spliced_lines_equal_encoding_the_whole_record(new: tuple[str, ...]) -> None:
    rng = random.Random(7)
    splice = FieldSplicer(new)
    spliced = 0
    for _ in range(3000):
        keys = rng.sample(KEYS, rng.randrange(len(KEYS) + 1))
        # key, value and look-alike text: `, "source": ` inside a value must not be cut at
        record = {
            k: _string(rng, 8) + rng.choice(["", ', "source": ', '", "text": "']) for k in keys
        }
        values = [_string(rng, 6) for _ in new]
        line = record_line(record)
        got = splice(line, record, values)
        assert got == record_line({**record, **dict(zip(new, values, strict=True))})
        assert json.loads(got) == {**record, **dict(zip(new, values, strict=True))}
        spliced += not any(min(new) <= k <= max(new) for k in keys)
    assert spliced > 300  # the splicing path ran, not only the fallback


def test_record_lines_are_sorted_utf8_json(tmp_path: Path) -> None:
    record = {"text": 'é "q" \\', "id": "1"}
    assert record_line(record) == b'{"id": "1", "text": "\xc3\xa9 \\"q\\" \\\\"}\n'
    path = tmp_path / "r.jsonl"
    path.write_bytes(record_line(record) + record_line({"id": "2"}))
    assert list(iter_lines(path, start=1)) == [(record_line({"id": "2"}), {"id": "2"})]
    assert list(iter_records(path)) == [record, {"id": "2"}]
