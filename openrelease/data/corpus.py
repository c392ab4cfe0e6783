"""The data stage's corpus: synthetic and imported records per role, held out, de-overlapped.

Small roles (sft, dpo, distill, grpo, eval_problems, eval_dpo: thousands of records) are kept in
memory. The large ones stream: the synthetic stories come one at a time (`synthetic.iter_stories`),
the held-out share going straight to ``eval_text.jsonl``; the pretraining documents (the other
stories, then every import of role pretrain, read lazily by `importers.open_source`) go one by
one, with their ids, to `DOCS_INPUT`, which tokenizer training and packing read back. So memory
holds the small roles, one import batch and one set that grows with the corpus: the 32-byte
sha256 digests of the held-out texts (eval_fraction of the stories; about 100 bytes each in a
set, 0.25 MB for 50,000 stories). No digest is kept per pretraining document: documents are only
checked against the held-out items, never against each other (nor were they before streaming).

The records, their order and the overlap rule are those of the in-memory stage this replaced,
so the output is byte-identical. To check every document against every held-out item before it
is written, the corpus is gathered in two passes: first the held-out stories, the synthetic
problems and the imports of every role but pretrain (in their order); then the pretraining
documents. Decision: a broken import of another role is therefore reported before a broken
pretrain import even when listed after it (each source is still read exactly once).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from openrelease.data import synthetic
from openrelease.data.importers import open_source, read_source
from openrelease.data.records import RecordWriter
from openrelease.data.tasks import format_answer
from openrelease.digest import sha256_json
from openrelease.manifest import DatasetEntry, PinnedSource, SourceEntry
from openrelease.params import DataParams, ImportParams

logger = logging.getLogger(__name__)

DOCS_INPUT = ".pretrain_docs.in.jsonl"
"""The gathered pretraining documents (with ids), in the stage's temp folder, for packing."""
EVAL_TEXT = "eval_text.jsonl"
ID_PREFIXES = {
    "pretrain_docs": "doc",
    "eval_text": "eval",
    "eval_problems": "evalp",
    "eval_dpo": "evald",
}
"""Record id prefixes that are not the role's name."""
CHECKED_ROLES = (("sft", "prompt"), ("dpo", "prompt"), ("distill", "prompt"), ("grpo", "prompt"))
"""Small training roles and the field checked against the held-out items."""


def record_id(role: str, index: int) -> str:
    """The id of record ``index`` of ``role`` (``doc-0000042``, ``sft-0000007``)."""
    return f"{ID_PREFIXES.get(role, role)}-{index:07d}"


def with_ids(role: str, records: list[dict[str, str]]) -> list[dict[str, str]]:
    """``records`` with their ids."""
    return [{"id": record_id(role, i), **r} for i, r in enumerate(records)]


def text_key(text: str) -> bytes:
    """The sha256 of ``text`` normalised (whitespace collapsed, lower case): equal texts match."""
    return hashlib.sha256(" ".join(text.split()).lower().encode()).digest()


def eval_take(count: int, fraction: float) -> int:
    """How many of ``count`` items are held out for evaluation."""
    return max(1, round(count * fraction)) if count > 1 else 0


@dataclass
class Corpus:
    """Small roles' records; the held-out stories and the pretraining documents as files."""

    eval_text: DatasetEntry
    """``eval_text.jsonl``, already written (with ids)."""
    docs_path: Path
    """`DOCS_INPUT`: the pretraining documents with ids, one record each."""
    num_docs: int = 0
    roles: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    sources: list[SourceEntry] = field(default_factory=list)

    def add(self, role: str, records: list[dict[str, str]]) -> None:
        """Append ``records`` to a small role."""
        self.roles.setdefault(role, []).extend(records)

    def held_out_keys(self) -> set[bytes]:
        """Keys of the held-out items other than the stories: eval problems and pairs."""
        keys = {text_key(r["prompt"]) for r in self.roles.get("eval_problems", [])}
        return keys | {text_key(r["prompt"]) for r in self.roles.get("eval_dpo", [])}


def gather_corpus(params: DataParams, *, seed: int, project_dir: Path, out_dir: Path) -> Corpus:
    """Generate and import the corpus; write ``eval_text.jsonl`` and `DOCS_INPUT` in ``out_dir``.

    Training items whose normalised text equals a held-out item are dropped (with a warning).
    """
    stories = synthetic.iter_stories(seed, params.synthetic.num_stories)
    n_eval = eval_take(params.synthetic.num_stories, params.eval_fraction)
    held_out, eval_text = _write_eval_text(stories, n_eval, out_dir / EVAL_TEXT)
    corpus = Corpus(eval_text=eval_text, docs_path=out_dir / DOCS_INPUT)
    _add_problems(corpus, params, seed)
    corpus.sources.append(_synthetic_source(params, seed))
    imported: dict[int, SourceEntry] = {}
    for i, spec in enumerate(params.imports):
        if spec.role != "pretrain":
            imported[i] = _add_import(corpus, spec, params.eval_fraction, project_dir)
    held_out |= corpus.held_out_keys()
    with RecordWriter(corpus.docs_path) as docs:
        rows = ({"text": t, "source": "synthetic"} for t in stories)
        dropped = _write_docs(docs, rows, held_out)
        for i, spec in enumerate(params.imports):
            if spec.role == "pretrain":
                imported[i], n = _write_import_docs(docs, spec, project_dir, held_out)
                dropped += n
    corpus.num_docs = docs.num_records
    _warn_dropped("pretrain_docs", dropped)
    _drop_small_overlap(corpus, held_out)
    corpus.sources += [imported[i] for i in range(len(params.imports))]
    return corpus


def _write_eval_text(
    stories: Iterator[str], count: int, path: Path
) -> tuple[set[bytes], DatasetEntry]:
    """Write the first ``count`` stories as held-out texts; return their keys and the entry."""
    keys: set[bytes] = set()
    with RecordWriter(path) as out:
        for i, text in zip(range(count), stories, strict=False):  # takes count stories, no more
            out.write({"id": record_id("eval_text", i), "text": text, "source": "synthetic"})
            keys.add(text_key(text))
    return keys, out.entry()


def _write_docs(docs: RecordWriter, rows: Iterable[dict[str, str]], held_out: set[bytes]) -> int:
    """Write the documents that are not held-out texts, numbering on; return how many were not."""
    dropped = 0
    for row in rows:
        if text_key(row["text"]) in held_out:
            dropped += 1
            continue
        docs.write({"id": record_id("pretrain_docs", docs.num_records), **row})
    return dropped


def _write_import_docs(
    docs: RecordWriter, spec: ImportParams, project_dir: Path, held_out: set[bytes]
) -> tuple[SourceEntry, int]:
    """Stream one pretrain import into ``docs``; its source entry and the documents dropped."""
    stream = open_source(spec, project_dir=project_dir)
    dropped = _write_docs(docs, ({**r, "source": spec.name} for r in stream), held_out)
    entry = _source_entry(
        spec, stream.path, stream.sha256, stream.num_records, stream.license, stream.pinned
    )
    return entry, dropped


def _add_problems(corpus: Corpus, params: DataParams, seed: int) -> None:
    """The synthetic arithmetic problems: held-out problems and pairs, sft, dpo, distill, grpo."""
    syn = params.synthetic
    problems = synthetic.generate_problems(seed, syn.num_problems, max_operand=syn.max_operand)
    p_eval = eval_take(len(problems), params.eval_fraction)
    as_rows = [
        {
            "prompt": p.prompt,
            "reasoning": p.reasoning,
            "answer": str(p.answer),
            "source": "synthetic",
        }
        for p in problems
    ]
    corpus.add("eval_problems", as_rows[:p_eval])
    rest = as_rows[p_eval:]
    n_sft, n_distill = int(len(rest) * 0.4), int(len(rest) * 0.3)
    corpus.add(
        "sft",
        [
            {"prompt": r["prompt"], "response": format_answer(r["answer"]), "source": "synthetic"}
            for r in rest[:n_sft]
        ],
    )
    # Preference pairs reuse the sft problems with worked answers: a correct one over a wrong one.
    sft_problems = problems[p_eval : p_eval + n_sft]
    corpus.add("dpo", _pair_rows(synthetic.preference_pairs(seed, sft_problems, label="train")))
    corpus.add(
        "eval_dpo", _pair_rows(synthetic.preference_pairs(seed, problems[:p_eval], label="eval"))
    )
    corpus.add("distill", rest[n_sft : n_sft + n_distill])
    corpus.add(
        "grpo",
        [
            {"prompt": r["prompt"], "answer": r["answer"], "source": "synthetic"}
            for r in rest[n_sft + n_distill :]
        ],
    )


def _pair_rows(pairs: list[synthetic.PreferencePair]) -> list[dict[str, str]]:
    return [
        {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "source": "synthetic"}
        for p in pairs
    ]


def _synthetic_source(params: DataParams, seed: int) -> SourceEntry:
    syn = params.synthetic
    spec = {"generator": "openrelease.synthetic/1", "seed": seed, **syn.model_dump()}
    return SourceEntry(
        name="synthetic",
        kind="synthetic",
        path=None,
        sha256=sha256_json(spec),
        num_records=syn.num_stories + syn.num_problems,
    )


def _add_import(
    corpus: Corpus, spec: ImportParams, eval_fraction: float, project_dir: Path
) -> SourceEntry:
    """Read one import of a small role into ``corpus``; its source entry."""
    source = read_source(spec, project_dir=project_dir)
    records = [{**r, "source": spec.name} for r in source.records]
    if spec.role == "dpo":
        # Imported pairs are the only preference data a real recipe has: hold out a share
        # for the eval stage's preference accuracy.
        n_eval = eval_take(len(records), eval_fraction)
        corpus.add("eval_dpo", records[:n_eval])
        records = records[n_eval:]
    corpus.add(spec.role, records)
    return _source_entry(
        spec, source.path, source.sha256, len(source.records), source.license, source.pinned
    )


def _source_entry(
    spec: ImportParams,
    path: str,
    sha256: str,
    num_records: int,
    license: str | None,
    pinned: PinnedSource | None,
) -> SourceEntry:
    return SourceEntry(
        name=spec.name if spec.format == "hub" else Path(path).name,
        kind=spec.format,
        path=path,
        sha256=sha256,
        num_records=num_records,
        license=license,
        pinned=pinned,
    )


def _drop_small_overlap(corpus: Corpus, held_out: set[bytes]) -> None:
    """Drop small-role training items whose checked field is a held-out text."""
    for role, key_field in CHECKED_ROLES:
        records = corpus.roles.get(role, [])
        kept = [r for r in records if text_key(r[key_field]) not in held_out]
        _warn_dropped(role, len(records) - len(kept))
        corpus.roles[role] = kept


def _warn_dropped(role: str, dropped: int) -> None:
    if dropped:
        logger.warning("dropped %d %s records that duplicate held-out eval items", dropped, role)
