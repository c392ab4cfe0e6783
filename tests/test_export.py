"""`openrelease data export`: the exact samples of a step range, tied to the order digests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from openrelease.cli import app
from openrelease.data.store import DataStore
from openrelease.train import main_from_cli
from openrelease.train.checkpoint import list_checkpoints
from openrelease.train.job import IGNORE_INDEX


def _export(*args: str) -> dict[str, object]:
    result = CliRunner().invoke(app, ["data", "export", *args, "--json"])
    assert result.exit_code == 0, result.output
    report: dict[str, object] = json.loads(result.output)
    return report


def _rows(folder: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def test_export_matches_data_batch_and_the_packed_tokens(project: Path) -> None:
    report = _export("--stage", "pretrain", "--from-step", "3", "--to-step", "3", "--out", "ex")
    batch = CliRunner().invoke(
        app, ["data", "batch", "--stage", "pretrain", "--step", "3", "--json"]
    )
    shown = json.loads(batch.output)
    assert report["order_digest"] == shown["order_digest"]
    rows = _rows(project / "ex")
    assert [r["index"] for r in rows] == [s["index"] for s in shown["samples"]]
    assert [r["doc_ids"] for r in rows] == [s["doc_ids"] for s in shown["samples"]]
    store = DataStore(project / "artifacts/data")
    for row in rows:
        assert row["step"] == 3
        assert row["input_ids"] == store.pretrain_sequence(int(row["index"])).tolist()  # type: ignore[call-overload]
        assert row["sources"] == ["synthetic"] * len(row["doc_ids"])  # type: ignore[arg-type]

    sft = _export("--stage", "sft", "--from-step", "1", "--to-step", "2", "--out", "sft-ex")
    assert sft["num_samples"] == 16
    for row in _rows(project / "sft-ex"):  # the prompt carries no loss, the reply does
        labels = row["labels"]
        assert isinstance(labels, list) and labels[0] == IGNORE_INDEX and labels[-1] != IGNORE_INDEX
        assert len(labels) == len(row["input_ids"])  # type: ignore[arg-type]

    again = CliRunner().invoke(
        app,
        [
            "data",
            "export",
            "--stage",
            "sft",
            "--from-step",
            "1",
            "--to-step",
            "2",
            "--out",
            "sft-ex",
        ],
    )
    assert again.exit_code == 1 and "already exists" in again.output
    bad = CliRunner().invoke(
        app,
        ["data", "export", "--stage", "sft", "--from-step", "3", "--to-step", "9", "--out", "x"],
    )
    assert bad.exit_code == 1 and "not inside stage sft's 1..4" in bad.output


@pytest.mark.slow
def test_export_of_a_checkpoint_stretch_has_its_data_digest(project: Path) -> None:
    main_from_cli("pretrain", project / "params.yaml", project)
    last = list_checkpoints(project / "artifacts/pretrain/checkpoints")[-1]
    first_step = last.sample_range[0] // 8 + 1  # global_batch_size 8 in the test params
    report = _export(
        "--stage",
        "pretrain",
        "--from-step",
        str(first_step),
        "--to-step",
        str(last.step),
        "--out",
        "ck",
    )
    assert report["order_digest"] == last.data_digest
    assert report["num_samples"] == last.sample_range[1] - last.sample_range[0]
    assert report["num_tokens"] == report["num_samples"] * 64  # type: ignore[operator]
