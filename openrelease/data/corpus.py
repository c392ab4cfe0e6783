"""The data stage's corpus: synthetic and imported records per role, held out, de-overlapped.

Every role streams through files, so memory does not grow with the corpus or the imports. The
synthetic stories come one at a time (`synthetic.iter_stories`), the held-out share going
straight to ``eval_text.jsonl``; the pretraining documents (the other stories, then every
import of role pretrain, read lazily by `importers.open_source`) go one by one, with their ids,
to `DOCS_INPUT`, which tokenizer training and packing read back. The small roles (sft, dpo,
distill, grpo, eval_problems, eval_dpo) are spooled record by record to hidden files of the
stage's temp folder (`Spools`: the synthetic records, then each import's, read lazily too, in
params order), then streamed from there, with their ids, into their final files
(``sft.jsonl`` ...), which tokenizer training reads back; the spools are then deleted (on a
failure, with the temp folder). So memory holds one import batch, the synthetic problems (a
list of data.synthetic.num_problems) and one set that grows with the corpus: the 32-byte sha256
digests of the held-out texts (eval_fraction of the stories, the eval problems and pairs; about
100 bytes each in a set, 0.25 MB for 50,000 stories). No digest is kept per training record:
records are only checked against the held-out items, never against each other (nor were they
before streaming).

The records, their order and the overlap rule are those of the in-memory stage this replaced,
so the output is byte-identical. To check every record against every held-out item before it
is written, the corpus is gathered in passes: first the held-out stories, the synthetic
problems and the imports of every role but pretrain, in their order, to the spools; then the
held-out sets (``eval_problems.jsonl``; ``eval_dpo.jsonl``: the synthetic pairs, then each dpo
import's first `eval_take` pairs, a count known only once it is read whole, so split off its
stretch of the dpo spool as it is read back); then the pretraining documents; then the training
roles from their spools. Decision: a broken import of another role is therefore reported before
a broken pretrain import even when listed after it (each source is still read exactly once);
the imports of the small roles are read, and their errors reported, in params order as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from openrelease.data import synthetic
from openrelease.data.importers import open_source
from openrelease.data.records import RecordWriter, iter_records
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
SMALL_ROLES = ("sft", "dpo", "distill", "grpo", "eval_problems", "eval_dpo")
"""The roles spooled (`Spools`) before their final files are written."""


def record_id(role: str, index: int) -> str:
    """The id of record ``index`` of ``role`` (``doc-0000042``, ``sft-0000007``)."""
    return f"{ID_PREFIXES.get(role, role)}-{index:07d}"


def text_key(text: str) -> bytes:
    """The sha256 of ``text`` normalised (whitespace collapsed, lower case): equal texts match."""
    return hashlib.sha256(" ".join(text.split()).lower().encode()).digest()


def eval_take(count: int, fraction: float) -> int:
    """How many of ``count`` items are held out for evaluation."""
    return max(1, round(count * fraction)) if count > 1 else 0


@dataclass
class Corpus:
    """The gathered corpus as files in ``out_dir``: every role's but the packed documents'."""

    out_dir: Path
    datasets: dict[str, DatasetEntry] = field(default_factory=dict)
    """``eval_text`` and the small roles: their files in ``out_dir``, written (with ids)."""
    num_docs: int = 0
    sources: list[SourceEntry] = field(default_factory=list)

    @property
    def docs_path(self) -> Path:
        """`DOCS_INPUT`: the pretraining documents with ids, one record each."""
        return self.out_dir / DOCS_INPUT

    def records(self, role: str) -> Iterator[dict[str, str]]:
        """The records of a role's file (``eval_text`` or a small role), read back lazily."""
        return iter_records(self.out_dir / self.datasets[role].path)


@dataclass
class Spools:
    """The small roles' records as gathered, before the held-out split and the overlap check.

    One hidden file per role in the stage's temp folder (`path`): the synthetic records, then
    each import's in params order, with their ``source`` and without ids.
    """

    out_dir: Path
    dpo_stretches: list[tuple[int, int]] = field(default_factory=list)
    """The dpo spool in order, stretch by stretch: (records, how many of the first are held)."""

    def path(self, role: str) -> Path:
        """The spool of ``role`` (``.sft.in.jsonl``)."""
        return self.out_dir / f".{role}.in.jsonl"

    def records(self, role: str) -> Iterator[dict[str, str]]:
        """A role's spooled records; for dpo, the training ones (not held out)."""
        if role == "dpo":
            return (r for held, r in self._dpo_rows() if not held)
        return iter_records(self.path(role))

    def held_pairs(self) -> Iterator[dict[str, str]]:
        """The held-out share of each dpo import, in order."""
        return (r for held, r in self._dpo_rows() if held)

    def _dpo_rows(self) -> Iterator[tuple[bool, dict[str, str]]]:
        flags = (i < held for count, held in self.dpo_stretches for i in range(count))
        return zip(flags, iter_records(self.path("dpo")), strict=True)

    def remove(self) -> None:
        """Delete the spools."""
        for role in SMALL_ROLES:
            self.path(role).unlink()


def gather_corpus(params: DataParams, *, seed: int, project_dir: Path, out_dir: Path) -> Corpus:
    """Generate and import the corpus; write every role's file but the packed documents'.

    In ``out_dir``: ``eval_text.jsonl``, the small roles' files and `DOCS_INPUT`. Training items
    whose normalised text equals a held-out item are dropped (with a warning).
    """
    stories = synthetic.iter_stories(seed, params.synthetic.num_stories)
    n_eval = eval_take(params.synthetic.num_stories, params.eval_fraction)
    held_out, eval_text = _write_eval_text(stories, n_eval, out_dir / EVAL_TEXT)
    corpus = Corpus(out_dir=out_dir, datasets={"eval_text": eval_text})
    corpus.sources.append(_synthetic_source(params, seed))
    spools = Spools(out_dir)
    imported = _spool_small_roles(spools, params, seed, project_dir)
    held_out |= _write_held_out(corpus, spools)
    with RecordWriter(corpus.docs_path) as docs:
        rows = ({"text": t, "source": "synthetic"} for t in stories)
        dropped = _write_kept(docs, "pretrain_docs", "text", rows, held_out)
        for i, spec in enumerate(params.imports):
            if spec.role == "pretrain":
                imported[i], n = _write_import_docs(docs, spec, project_dir, held_out)
                dropped += n
    corpus.num_docs = docs.num_records
    _warn_dropped("pretrain_docs", dropped)
    _write_training(corpus, spools, held_out)
    spools.remove()
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


def _spool_small_roles(
    spools: Spools, params: DataParams, seed: int, project_dir: Path
) -> dict[int, SourceEntry]:
    """Spool the synthetic problems, then each small role's import; the imports' entries."""
    imported: dict[int, SourceEntry] = {}
    with contextlib.ExitStack() as stack:
        out = {role: stack.enter_context(RecordWriter(spools.path(role))) for role in SMALL_ROLES}
        _add_problems(out, params, seed)
        spools.dpo_stretches.append((out["dpo"].num_records, 0))
        for i, spec in enumerate(params.imports):
            if spec.role != "pretrain":
                imported[i] = _spool_import(out[spec.role], spools, spec, params, project_dir)
    return imported


def _spool_import(
    out: RecordWriter, spools: Spools, spec: ImportParams, params: DataParams, project_dir: Path
) -> SourceEntry:
    """Stream one import of a small role into its spool; its source entry."""
    stream = open_source(spec, project_dir=project_dir)
    for record in stream:
        out.write({**record, "source": spec.name})
    if spec.role == "dpo":
        # Imported pairs are the only preference data a real recipe has: hold out a share
        # for the eval stage's preference accuracy.
        count = stream.num_records
        spools.dpo_stretches.append((count, eval_take(count, params.eval_fraction)))
    return _source_entry(
        spec, stream.path, stream.sha256, stream.num_records, stream.license, stream.pinned
    )


def _write_held_out(corpus: Corpus, spools: Spools) -> set[bytes]:
    """Write the eval problems and pairs (imported pairs after the synthetic); their keys."""
    keys: set[bytes] = set()
    sets = {
        "eval_problems": spools.records("eval_problems"),
        "eval_dpo": chain(spools.records("eval_dpo"), spools.held_pairs()),
    }
    for role, rows in sets.items():
        with RecordWriter(corpus.out_dir / f"{role}.jsonl") as out:
            for row in rows:
                out.write({"id": record_id(role, out.num_records), **row})
                keys.add(text_key(row["prompt"]))
        corpus.datasets[role] = out.entry()
    return keys


def _write_training(corpus: Corpus, spools: Spools, held_out: set[bytes]) -> None:
    """Write the small training roles, dropping items whose checked field is a held-out text."""
    for role, key_field in CHECKED_ROLES:
        with RecordWriter(corpus.out_dir / f"{role}.jsonl") as out:
            dropped = _write_kept(out, role, key_field, spools.records(role), held_out)
        _warn_dropped(role, dropped)
        corpus.datasets[role] = out.entry()


def _write_kept(
    out: RecordWriter,
    role: str,
    key_field: str,
    rows: Iterable[dict[str, str]],
    held_out: set[bytes],
) -> int:
    """Write the rows whose ``key_field`` is not a held-out text, numbering on; how many were."""
    dropped = 0
    for row in rows:
        if text_key(row[key_field]) in held_out:
            dropped += 1
            continue
        out.write({"id": record_id(role, out.num_records), **row})
    return dropped


def _write_import_docs(
    docs: RecordWriter, spec: ImportParams, project_dir: Path, held_out: set[bytes]
) -> tuple[SourceEntry, int]:
    """Stream one pretrain import into ``docs``; its source entry and the documents dropped."""
    stream = open_source(spec, project_dir=project_dir)
    rows = ({**r, "source": spec.name} for r in stream)
    dropped = _write_kept(docs, "pretrain_docs", "text", rows, held_out)
    entry = _source_entry(
        spec, stream.path, stream.sha256, stream.num_records, stream.license, stream.pinned
    )
    return entry, dropped


def _add_problems(out: dict[str, RecordWriter], params: DataParams, seed: int) -> None:
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
    out["eval_problems"].write_all(as_rows[:p_eval])
    rest = as_rows[p_eval:]
    n_sft, n_distill = int(len(rest) * 0.4), int(len(rest) * 0.3)
    out["sft"].write_all(
        (
            {"prompt": r["prompt"], "response": format_answer(r["answer"]), "source": "synthetic"}
            for r in rest[:n_sft]
        ),
    )
    # Preference pairs reuse the sft problems with worked answers: a correct one over a wrong one.
    sft_problems = problems[p_eval : p_eval + n_sft]
    out["dpo"].write_all(_pair_rows(synthetic.preference_pairs(seed, sft_problems, label="train")))
    out["eval_dpo"].write_all(
        _pair_rows(synthetic.preference_pairs(seed, problems[:p_eval], label="eval")),
    )
    out["distill"].write_all(rest[n_sft : n_sft + n_distill])
    out["grpo"].write_all(
        (
            {"prompt": r["prompt"], "answer": r["answer"], "source": "synthetic"}
            for r in rest[n_sft + n_distill :]
        ),
    )


def _pair_rows(pairs: list[synthetic.PreferencePair]) -> Iterator[dict[str, str]]:
    return (
        {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "source": "synthetic"}
        for p in pairs
    )


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


def _warn_dropped(role: str, dropped: int) -> None:
    if dropped:
        logger.warning("dropped %d %s records that duplicate held-out eval items", dropped, role)
