"""The data stage's small roles (sft, dpo, distill, grpo, eval sets) stream through files."""

import json
import logging
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from openrelease.data import importers
from openrelease.data.corpus import gather_corpus
from openrelease.data.stage import _training_texts, build_data
from openrelease.data.store import DataStore
from openrelease.params import ImportParams, PipelineParams


class _Row(dict[str, str]):
    """An imported record the test can watch (dict subclasses take weak references)."""


def _imports(*specs: tuple[str, str]) -> tuple[ImportParams, ...]:
    return tuple(
        ImportParams.model_validate({"format": "jsonl", "path": path, "role": role})
        for path, role in specs
    )


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_small_role_imports_are_never_held_whole(
    tmp_path: Path, tiny_params: PipelineParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each imported record is spooled and dropped before the next one is read.

    Counts the records read still alive each time a new one is read; the stage before
    streaming (every record of an import in a list) held them all.
    """
    read_jsonl, alive, counts = importers._read_jsonl, [0], []

    def gone() -> None:
        alive[0] -= 1

    def watched(path: Path, spec: ImportParams) -> Iterator[dict[str, str]]:
        for record in read_jsonl(path, spec):
            row = _Row(record)
            weakref.finalize(row, gone)
            alive[0] += 1
            counts.append(alive[0])
            yield row

    monkeypatch.setattr(importers, "_read_jsonl", watched)
    _write(
        tmp_path / "sft.jsonl", [{"prompt": f"Say {i}", "response": f"{i}!"} for i in range(300)]
    )
    pairs = [{"prompt": f"Pick {i}", "chosen": "a", "rejected": "b"} for i in range(200)]
    _write(tmp_path / "pairs.jsonl", pairs)
    imports = _imports(("sft.jsonl", "sft"), ("pairs.jsonl", "dpo"))
    data = tiny_params.data.model_copy(update={"imports": imports})
    build_data(data, seed=tiny_params.seed, project_dir=tmp_path)
    assert len(counts) == 500
    assert max(counts) <= 3, max(counts)
    store = DataStore(tmp_path / "artifacts/data")
    sft = store.records("sft")
    assert [r["id"] for r in sft] == [f"sft-{i:07d}" for i in range(len(sft))]
    mine = [r["prompt"] for r in sft if r["source"] == "sft.jsonl"]
    assert mine == [f"Say {i}" for i in range(300)] and sft[-1]["source"] == "sft.jsonl"
    held = [r["prompt"] for r in store.records("eval_dpo") if r["source"] == "pairs.jsonl"]
    assert held == [f"Pick {i}" for i in range(10)]  # the import's first 5 %, after synthetic


def test_imported_pairs_are_held_out_in_import_order(
    tmp_path: Path, tiny_params: PipelineParams, caplog: pytest.LogCaptureFixture
) -> None:
    """Each dpo import holds out its own first pairs; a later import's copy of one is dropped."""
    _write(
        tmp_path / "a.jsonl",
        [{"prompt": f"A {i}", "chosen": "y", "rejected": "n"} for i in range(20)],
    )
    b = [{"prompt": f"B {i}", "chosen": "y", "rejected": "n"} for i in range(10)]
    b[5]["prompt"] = "a 0"  # normalised, the first held-out pair of a.jsonl
    _write(tmp_path / "b.jsonl", b)
    imports = _imports(("a.jsonl", "dpo"), ("b.jsonl", "dpo"))
    data = tiny_params.data.model_copy(update={"imports": imports, "eval_fraction": 0.1})
    with caplog.at_level(logging.WARNING):
        build_data(data, seed=tiny_params.seed, project_dir=tmp_path)
    assert "dropped 1 dpo records that duplicate held-out eval items" in caplog.text
    store = DataStore(tmp_path / "artifacts/data")
    eval_dpo = store.records("eval_dpo")
    assert [r["id"] for r in eval_dpo] == [f"evald-{i:07d}" for i in range(len(eval_dpo))]
    sources = [r["source"] for r in eval_dpo]
    assert sources == sorted(sources, key=["synthetic", "a.jsonl", "b.jsonl"].index)
    assert [r["prompt"] for r in eval_dpo if r["source"] != "synthetic"] == ["A 0", "A 1", "B 0"]
    dpo = [r["prompt"] for r in store.records("dpo") if r["source"] != "synthetic"]
    assert dpo == [f"A {i}" for i in range(2, 20)] + [f"B {i}" for i in (1, 2, 3, 4, 6, 7, 8, 9)]


def test_the_small_roles_are_files_and_the_spools_go(
    tmp_path: Path, tiny_params: PipelineParams
) -> None:
    """The corpus writes the small roles' final files; tokenizer training reads them back."""
    _write(tmp_path / "g.jsonl", [{"prompt": f"G {i}", "answer": str(i)} for i in range(7)])
    data = tiny_params.data.model_copy(update={"imports": _imports(("g.jsonl", "grpo"))})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    corpus = gather_corpus(data, seed=tiny_params.seed, project_dir=tmp_path, out_dir=out_dir)
    roles = ("sft", "dpo", "distill", "grpo", "eval_text", "eval_problems", "eval_dpo")
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [".pretrain_docs.in.jsonl", *(f"{role}.jsonl" for role in roles)]
    )
    grpo = list(corpus.records("grpo"))
    assert [r["prompt"] for r in grpo[-7:]] == [f"G {i}" for i in range(7)]
    n = {role: corpus.datasets[role].num_records for role in roles}
    texts = list(_training_texts(corpus))
    per_role = 2 * n["sft"] + 3 * n["dpo"] + 2 * n["distill"] + n["grpo"]
    assert len(texts) == corpus.num_docs + per_role
    assert texts[-7:] == [f"G {i}" for i in range(7)]
