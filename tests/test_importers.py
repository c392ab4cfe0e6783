import json
from pathlib import Path

import pytest

from openrelease.data import importers
from openrelease.data.importers import SourceStream, open_source
from openrelease.data.stage import build_data
from openrelease.data.store import DataStore
from openrelease.errors import DataError
from openrelease.params import ImportParams, PipelineParams


def _spec(path: str, fmt: str = "jsonl", role: str = "sft", **kw: str) -> ImportParams:
    return ImportParams.model_validate({"format": fmt, "path": path, "role": role, **kw})


def _read(spec: ImportParams, project_dir: Path) -> tuple[SourceStream, list[dict[str, str]]]:
    """Open ``spec`` and read all its records (the stream's sha256 is final after)."""
    stream = open_source(spec, project_dir=project_dir)
    return stream, list(stream)


def test_jsonl_roundtrip(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(
        '{"prompt": "p1", "response": "r1"}\n\n{"prompt": "p2", "response": "r2", "x": 1}\n'
    )
    src, records = _read(_spec("a.jsonl"), tmp_path)
    assert records == [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]
    assert src.sha256.startswith("sha256:")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{"prompt": "p"}\n', r"a.jsonl:1: missing field 'response'"),
        (b'{"prompt": "p", "response": "r"}\n{oops\n', r"a.jsonl:2: invalid JSON"),
        (b"[1, 2]\n", r"a.jsonl:1: expected an object"),
        (b'{"prompt": "p", "response": ["r"]}\n', r"a.jsonl:1: field 'response' must be a string"),
        (b'{"prompt": "\xff", "response": "r"}\n', r"a.jsonl:1: not valid UTF-8"),
        (b'{"prompt": "  ", "response": "r"}\n', r"a.jsonl:1: field 'prompt' is empty"),
        (b"\n\n", r"no records found"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, content: bytes, match: str) -> None:
    (tmp_path / "a.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=match):
        _read(_spec("a.jsonl"), tmp_path)


def test_text_blocks_and_role_check(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("first doc\nline two\n\n\nsecond doc\n")
    _, records = _read(_spec("t.txt", "text", "pretrain"), tmp_path)
    assert [r["text"] for r in records] == ["first doc\nline two", "second doc"]
    with pytest.raises(DataError, match="text files can only feed role pretrain"):
        _read(_spec("t.txt", "text", "sft"), tmp_path)
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xfe\n")
    with pytest.raises(DataError, match=r"bad.txt:2: not valid UTF-8"):
        _read(_spec("bad.txt", "text", "pretrain"), tmp_path)


def test_records_are_read_lazily(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{oops\n')
    stream = open_source(_spec("a.jsonl", role="pretrain"), project_dir=tmp_path)
    records = iter(stream)
    assert next(records) == {"text": "one"}  # the bad line 3 is not read yet
    assert next(records) == {"text": "two"}
    with pytest.raises(DataError, match=r"a.jsonl:3: invalid JSON"):
        next(records)


@pytest.mark.parametrize(
    "content",
    [
        b"one\r\n\r\ntwo\r\n\r\n\r\n  three \n\nfour\r\r\nfive\n\n",
        "\u00e9t\u00e9 \u2014 caf\u00e9\n\n\n\n\u2028x\u3000\n\n y".encode(),
        b"\n\n\n",
    ],
)
def test_text_read_in_chunks_splits_like_the_whole_file(
    tmp_path: Path, content: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks, CRLFs and multi-byte characters that straddle reads come out as from one read."""
    (tmp_path / "t.txt").write_bytes(content)
    text = content.decode().replace("\r\n", "\n")
    expected = [b.strip() for b in text.split("\n\n") if b.strip()]
    for chunk in (1, 2, 3, 5, 1 << 20):
        monkeypatch.setattr(importers, "READ_CHUNK_BYTES", chunk)
        stream = open_source(_spec("t.txt", "text", "pretrain"), project_dir=tmp_path)
        if not expected:
            with pytest.raises(DataError, match="no records found"):
                list(stream)
            continue
        assert [r["text"] for r in stream] == expected, chunk


def test_text_utf8_error_names_its_line_at_any_chunk_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "bad.txt").write_bytes("ok\n\u00e9\n\nmore\n".encode() + b"x\xc3\n")
    for chunk in (1, 2, 4, 1 << 20):
        monkeypatch.setattr(importers, "READ_CHUNK_BYTES", chunk)
        with pytest.raises(DataError, match=r"bad.txt:5: not valid UTF-8"):
            _read(_spec("bad.txt", "text", "pretrain"), tmp_path)


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["one", "two"]}), tmp_path / "d.parquet")
    _, records = _read(_spec("d.parquet", "parquet", "pretrain", text_field="body"), tmp_path)
    assert [r["text"] for r in records] == ["one", "two"]
    with pytest.raises(DataError, match=r"d.parquet:row 1: missing field 'text'"):
        _read(_spec("d.parquet", "parquet", "pretrain"), tmp_path)
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        _read(_spec("x.parquet", "parquet", "pretrain"), tmp_path)


def test_hf_datasets_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"prompt": ["2+2?", "3+3?"], "answer": ["4", "6"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    _, records = _read(_spec("ds", "hf_datasets", "grpo"), tmp_path)
    assert records == [{"prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?", "answer": "6"}]
    (tmp_path / "notds").mkdir()
    with pytest.raises(DataError, match="not a Hugging Face datasets folder"):
        _read(_spec("notds", "hf_datasets", "grpo"), tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        _read(_spec("nope.jsonl"), tmp_path)


def test_imports_join_the_corpus_and_are_hashed(
    tmp_path: Path, tiny_params: PipelineParams
) -> None:
    rows = [{"prompt": f"Say {i}", "response": f"{i}!"} for i in range(5)]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tiny_params.data.model_copy(update={"imports": (_spec("mine.jsonl"),)})
    manifest = build_data(data, seed=tiny_params.seed, project_dir=tmp_path)
    assert any(s.path == "mine.jsonl" and s.num_records == 5 for s in manifest.sources)
    sft = DataStore(tmp_path / "artifacts/data").records("sft")
    assert next(r for r in sft if r["source"] == "mine.jsonl")["prompt"] == "Say 0"


def test_failed_build_leaves_previous_output_intact(
    tmp_path: Path, tiny_params: PipelineParams
) -> None:
    build_data(tiny_params.data, seed=tiny_params.seed, project_dir=tmp_path)
    before = (tmp_path / "artifacts/data/manifest.json").read_bytes()
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    data = tiny_params.data.model_copy(update={"imports": (_spec("bad.jsonl"),)})
    with pytest.raises(DataError):
        build_data(data, seed=tiny_params.seed, project_dir=tmp_path)
    assert (tmp_path / "artifacts/data/manifest.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["data"]


def _pairs(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"Pick {i}", "chosen": f"{i}.", "rejected": f"{i + 1}."} for i in range(n)]


def test_dpo_pairs_from_jsonl_parquet_and_hf_datasets(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets = pytest.importorskip("datasets")
    rows = _pairs(3)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "pds"))
    for path, fmt in (("p.jsonl", "jsonl"), ("p.parquet", "parquet"), ("pds", "hf_datasets")):
        _, records = _read(_spec(path, fmt, "dpo"), tmp_path)
        assert records == rows, fmt
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "chosen": "c"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'rejected' needed by role"):
        _read(_spec("bad.jsonl", "jsonl", "dpo"), tmp_path)


def test_imported_pairs_hold_out_an_eval_share(tmp_path: Path, tiny_params: PipelineParams) -> None:
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs(40)))
    data = tiny_params.data.model_copy(
        update={"imports": (_spec("pairs.jsonl", "jsonl", "dpo"),), "eval_fraction": 0.1}
    )
    build_data(data, seed=tiny_params.seed, project_dir=tmp_path)
    store = DataStore(tmp_path / "artifacts/data")
    mine = [r for r in store.records("dpo") if r["source"] == "pairs.jsonl"]
    held = [r for r in store.records("eval_dpo") if r["source"] == "pairs.jsonl"]
    assert (len(mine), len(held)) == (36, 4)
    assert not {r["prompt"] for r in mine} & {r["prompt"] for r in held}
