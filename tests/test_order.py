"""The data order: a seeded Feistel permutation per epoch, evaluated and inverted pointwise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from openrelease.cli import app
from openrelease.data.order import (
    ORDER_ALGORITHM,
    EpochPermutation,
    global_batch,
    order_digest,
    range_digest,
    steps_of,
)
from openrelease.data.store import DataStore


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 15, 16, 17, 64, 1000, 4095, 4097, 65_537])
def test_each_epoch_is_a_bijection_and_inverts(n: int) -> None:
    perm = EpochPermutation(f"key-{n}".encode(), n)
    out = perm.forward(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    assert (perm.inverse(out) == np.arange(n)).all()
    if n >= 64:  # a real shuffle: few fixed points, and another key gives another order
        assert (out == np.arange(n)).mean() < 0.1
        assert (EpochPermutation(b"other", n).forward(np.arange(n)) != out).any()


def test_steps_of_matches_a_scan_over_every_epoch() -> None:
    kw = {"seed": 7, "data_digest": "sha256:x", "stage": "sft", "num_samples": 37}
    num_steps, gbs = 20, 8  # 160 positions: 4 full epochs and part of a fifth
    seen: dict[int, list[int]] = {}
    for step in range(1, num_steps + 1):
        for index in global_batch(step=step, global_batch_size=gbs, **kw):  # type: ignore[arg-type]
            seen.setdefault(index, []).append(step)
    for index in range(37):
        got = steps_of(index, global_batch_size=gbs, num_steps=num_steps, **kw)  # type: ignore[arg-type]
        assert got == sorted(seen.get(index, []))
    # Every epoch holds each sample once; the order differs per epoch, seed and stage.
    epoch0 = [i for s in range(1, 6) for i in global_batch(step=s, global_batch_size=8, **kw)][:37]  # type: ignore[arg-type]
    assert sorted(epoch0) == list(range(37))
    assert global_batch(step=1, global_batch_size=8, **{**kw, "seed": 8}) != global_batch(  # type: ignore[arg-type]
        step=1,
        global_batch_size=8,
        **kw,  # type: ignore[arg-type]
    )
    digest = range_digest(first_step=3, last_step=5, global_batch_size=8, **kw)  # type: ignore[arg-type]
    ids = [i for s in (3, 4, 5) for i in global_batch(step=s, global_batch_size=8, **kw)]  # type: ignore[arg-type]
    assert digest == order_digest(ids)


def test_a_billion_samples_cost_nothing_to_order() -> None:
    kw = {"seed": 1, "data_digest": "d", "stage": "pretrain", "num_samples": 10**9}
    batch = global_batch(step=123_456, global_batch_size=512, **kw)  # type: ignore[arg-type]
    assert len(set(batch)) == 512 and all(0 <= i < 10**9 for i in batch)
    for index in batch[:3]:
        assert 123_456 in steps_of(index, global_batch_size=512, num_steps=200_000, **kw)  # type: ignore[arg-type]


def test_where_text_limit_says_it_truncated(project: Path) -> None:
    result = CliRunner().invoke(app, ["data", "where", "--text", "the", "--limit", "3"])
    assert result.exit_code == 0, result.output
    assert "showing the first 3 of" in result.output
    assert "raise --limit" in result.output
    report = json.loads(
        CliRunner().invoke(app, ["data", "where", "--text", "the", "--limit", "3", "--json"]).output
    )
    assert len(report["doc_ids"]) == 3 and report["truncated"] is True
    assert report["total_matches"] > 3
    doc = CliRunner().invoke(app, ["data", "where", "--doc", "doc-0000003", "--json"])
    assert doc.exit_code == 0, doc.output
    assert json.loads(doc.output)["truncated"] is False


def test_data_built_for_another_order_is_refused(project: Path) -> None:
    manifest = project / "artifacts/data/manifest.json"
    raw = json.loads(manifest.read_text())
    assert raw["order_algorithm"] == ORDER_ALGORITHM
    raw["order_algorithm"] = "permutation-v0"
    manifest.write_text(json.dumps(raw))
    assert DataStore(project / "artifacts/data").manifest.order_algorithm == "permutation-v0"
    result = CliRunner().invoke(app, ["data", "batch", "--stage", "sft", "--step", "1"])
    assert result.exit_code == 1
    assert "built for data order 'permutation-v0'" in result.output
    assert "re-run `dvc repro data`" in result.output
    assert len(result.output.strip().splitlines()) == 1
