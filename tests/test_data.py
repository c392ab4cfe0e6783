import json
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from openrelease.data import synthetic
from openrelease.data.order import global_batch, order_digest, rank_slice
from openrelease.data.query import batch_at, where_seen
from openrelease.data.stage import build_data
from openrelease.data.store import DataStore
from openrelease.data.tasks import (
    extract_answer,
    format_reasoning,
    has_reasoning_format,
    is_correct,
)
from openrelease.digest import hash_folder
from openrelease.errors import DataError
from openrelease.params import PipelineParams


def test_synthetic_is_deterministic_and_seed_dependent() -> None:
    assert synthetic.generate_stories(1, 5) == synthetic.generate_stories(1, 5)
    assert synthetic.generate_stories(1, 5) != synthetic.generate_stories(2, 5)
    problems = synthetic.generate_problems(1, 50, max_operand=20)
    assert len({p.prompt for p in problems}) == 50
    for p in problems:
        assert str(p.answer) in p.reasoning


def test_too_many_problems_for_the_operand_range() -> None:
    with pytest.raises(ValueError, match="max_operand"):
        synthetic.generate_problems(1, 10_000, max_operand=2)


def test_two_builds_are_byte_identical(tmp_path: Path, tiny_params: PipelineParams) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ma = build_data(tiny_params.data, seed=tiny_params.seed, project_dir=a)
    mb = build_data(tiny_params.data, seed=tiny_params.seed, project_dir=b)
    assert ma == mb
    assert hash_folder(a / "artifacts/data") == hash_folder(b / "artifacts/data")


class _Story(str):
    """A generated story the test can watch (str subclasses take weak references)."""


def test_the_stage_streams_the_stories(
    tmp_path: Path, tiny_params: PipelineParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory is bounded: each story is written and dropped before the next one is made.

    Counts the generated stories still alive each time a new one is made; an in-memory
    corpus (every story in a list, the stage before streaming) would hold them all.
    """
    generate, alive, counts = synthetic.iter_stories, weakref.WeakSet[_Story](), []

    def watched(seed: int, count: int) -> Iterator[str]:
        for text in generate(seed, count):
            story = _Story(text)
            alive.add(story)
            counts.append(len(alive))
            yield story

    monkeypatch.setattr(synthetic, "iter_stories", watched)
    manifest = build_data(tiny_params.data, seed=tiny_params.seed, project_dir=tmp_path)
    assert len(counts) == tiny_params.data.synthetic.num_stories == 400
    assert max(counts) <= 3, counts
    stored = DataStore(tmp_path / "artifacts/data")
    texts = [r["text"] for r in _records(stored, "eval_text", "pretrain_docs")]
    assert texts == synthetic.generate_stories(tiny_params.seed, 400)  # every story, in order
    assert manifest.datasets["pretrain_docs"].num_records == 380


def _records(store: DataStore, *roles: str) -> list[dict[str, str]]:
    return [r for role in roles for r in store.records(role)]


def test_seed_changes_the_data(tmp_path: Path, tiny_params: PipelineParams, data_dir: Path) -> None:
    m = build_data(tiny_params.data, seed=tiny_params.seed + 1, project_dir=tmp_path)
    assert m.data_digest != DataStore(data_dir).manifest.data_digest


def test_manifest_lists_every_output_with_its_digest(data_dir: Path) -> None:
    from openrelease.digest import sha256_file

    store = DataStore(data_dir)
    m = store.manifest
    for shard in m.shards:
        assert sha256_file(data_dir / shard.path) == shard.sha256
        assert np.load(data_dir / shard.path).shape[1] == m.seq_len
    for entry in m.datasets.values():
        assert sha256_file(data_dir / entry.path) == entry.sha256
    assert sum(s.num_seqs for s in m.shards) == m.num_pretrain_seqs
    assert {s.kind for s in m.sources} == {"synthetic"}


def test_no_overlap_between_train_and_eval(data_dir: Path) -> None:
    store = DataStore(data_dir)
    eval_texts = {r["text"] for r in store.records("eval_text")}
    eval_prompts = {r["prompt"] for r in store.records("eval_problems")}
    assert eval_texts and eval_prompts
    assert not eval_texts & {r["text"] for r in store.records("pretrain_docs")}
    eval_prompts |= {r["prompt"] for r in store.records("eval_dpo")}
    for role in ("sft", "dpo", "distill", "grpo"):
        assert not eval_prompts & {r["prompt"] for r in store.records(role)}


def test_tokenizer_loads_with_transformers_and_has_chat_template(data_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    assert tok.bos_token == "<|bos|>" and tok.eos_token == "<|eos|>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], tokenize=False
    )
    assert text == "<|user|>Hi<|assistant|>Yo<|eos|>"
    probe = json.loads((data_dir / "tokenizer_probe.json").read_text())
    assert tok(probe["text"])["input_ids"] == probe["ids"]


def test_packed_sequences_decode_to_documents(data_dir: Path) -> None:
    from tokenizers import Tokenizer

    store = DataStore(data_dir)
    tok = Tokenizer.from_file(str(store.tokenizer_dir / "tokenizer.json"))
    first_doc = store.records("pretrain_docs")[0]
    decoded = tok.decode(store.pretrain_sequence(0).tolist(), skip_special_tokens=False)
    assert decoded.startswith("<|bos|>" + first_doc["text"][:20])


def test_order_is_pure_and_world_size_independent() -> None:
    kw = {
        "seed": 1,
        "data_digest": "sha256:x",
        "stage": "pretrain",
        "num_samples": 10,
        "global_batch_size": 4,
    }
    assert global_batch(step=3, **kw) == global_batch(step=3, **kw)
    assert global_batch(step=3, **kw) != global_batch(step=4, **kw)
    # Each epoch is a permutation: 5 steps of 4 = 2 epochs of 10 samples.
    seen = [i for step in range(1, 6) for i in global_batch(step=step, **kw)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    batch = global_batch(step=2, **kw)
    assert (
        rank_slice(batch, rank=0, world_size=2) + rank_slice(batch, rank=1, world_size=2) == batch
    )
    with pytest.raises(ValueError, match="does not split"):
        rank_slice(batch, rank=0, world_size=3)
    assert order_digest([1, 2]) != order_digest([2, 1])


def test_batch_at_is_stable_and_step_dependent(data_dir: Path, tiny_params: PipelineParams) -> None:
    store = DataStore(data_dir)
    a = batch_at(store, tiny_params, stage="pretrain", step=2)
    assert a == batch_at(store, tiny_params, stage="pretrain", step=2)
    assert a.samples != batch_at(store, tiny_params, stage="pretrain", step=3).samples
    assert len(a.samples) == tiny_params.pretrain.global_batch_size
    sft = batch_at(store, tiny_params, stage="sft", step=1)
    assert all(s.text.startswith("prompt: ") for s in sft.samples)


def test_where_finds_the_steps_that_saw_a_document(
    data_dir: Path, tiny_params: PipelineParams
) -> None:
    store = DataStore(data_dir)
    batch = batch_at(store, tiny_params, stage="sft", step=3)
    doc = batch.samples[0].doc_ids[0]
    report = where_seen(store, tiny_params, doc_id=doc)
    assert any(s.stage == "sft" and 3 in s.steps for s in report.sightings)
    pre = batch_at(store, tiny_params, stage="pretrain", step=5).samples[0].doc_ids[0]
    assert any(5 in s.steps for s in where_seen(store, tiny_params, doc_id=pre).sightings)
    with pytest.raises(DataError, match="no document matches"):
        where_seen(store, tiny_params, doc_id="doc-9999999")


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("The answer is 42.", 42),
        ("the answer is -7", -7),
        ("answer is 1,234.", 1234),
        ("The answer is 3. No, the answer is 5.", 5),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, answer: int | None) -> None:
    assert extract_answer(text) == answer


def test_reasoning_format_and_correctness() -> None:
    good = format_reasoning("2 + 2 = 4.", 4)
    assert has_reasoning_format(good) and is_correct(good, 4) and not is_correct(good, 5)
    assert not has_reasoning_format("<think></think> The answer is 4.")
    assert not has_reasoning_format("The answer is 4.")
