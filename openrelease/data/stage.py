"""`openrelease data`: build the corpus, split it, train the tokenizer, pack and write manifests.

The whole output folder is built beside the target and swapped in at the end, so a crash never
leaves a half-written data folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from openrelease.data import synthetic
from openrelease.data.importers import read_source
from openrelease.data.order import ORDER_ALGORITHM
from openrelease.data.pack import DOCS_FILE, SHARD_DIR, pack_documents
from openrelease.data.tasks import format_answer, format_reasoning
from openrelease.data.tokenizer import (
    BOS,
    EOS,
    fetch_tokenizer,
    make_probe,
    save_tokenizer,
    train_tokenizer,
    use_tokenizer,
)
from openrelease.digest import hash_folder, sha256_bytes, sha256_file, sha256_json, sha256_tree
from openrelease.errors import DataError
from openrelease.layout import STAGE_MANIFEST
from openrelease.manifest import (
    DataManifest,
    DatasetEntry,
    FileEntry,
    PinnedSource,
    SourceEntry,
    write_bytes_atomic,
    write_json,
)
from openrelease.params import DataParams, PipelineParams

logger = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass
class _Corpus:
    """Records per role, before tokenisation; ``sources`` describes where they came from."""

    roles: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    sources: list[SourceEntry] = field(default_factory=list)

    def add(self, role: str, records: list[dict[str, str]]) -> None:
        self.roles.setdefault(role, []).extend(records)


def _text_key(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).lower().encode()).hexdigest()


def _eval_take(count: int, fraction: float) -> int:
    return max(1, round(count * fraction)) if count > 1 else 0


def _add_synthetic(corpus: _Corpus, params: DataParams, seed: int) -> None:
    syn = params.synthetic
    stories = synthetic.generate_stories(seed, syn.num_stories)
    problems = synthetic.generate_problems(seed, syn.num_problems, max_operand=syn.max_operand)
    n_eval = _eval_take(len(stories), params.eval_fraction)
    corpus.add("eval_text", [{"text": t, "source": "synthetic"} for t in stories[:n_eval]])
    corpus.add("pretrain_docs", [{"text": t, "source": "synthetic"} for t in stories[n_eval:]])
    p_eval = _eval_take(len(problems), params.eval_fraction)
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
    spec = {"generator": "openrelease.synthetic/1", "seed": seed, **params.synthetic.model_dump()}
    corpus.sources.append(
        SourceEntry(
            name="synthetic",
            kind="synthetic",
            path=None,
            sha256=sha256_json(spec),
            num_records=len(stories) + len(problems),
        )
    )


def _pair_rows(pairs: list[synthetic.PreferencePair]) -> list[dict[str, str]]:
    return [
        {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "source": "synthetic"}
        for p in pairs
    ]


def _add_imports(corpus: _Corpus, params: DataParams, project_dir: Path) -> None:
    for spec in params.imports:
        source = read_source(spec, project_dir=project_dir)
        role = "pretrain_docs" if spec.role == "pretrain" else spec.role
        records = [{**r, "source": spec.name} for r in source.records]
        if spec.role == "dpo":
            # Imported pairs are the only preference data a real recipe has: hold out a share
            # for the eval stage's preference accuracy.
            n_eval = _eval_take(len(records), params.eval_fraction)
            corpus.add("eval_dpo", records[:n_eval])
            records = records[n_eval:]
        corpus.add(role, records)
        corpus.sources.append(
            SourceEntry(
                name=spec.name if spec.format == "hub" else Path(source.path).name,
                kind=spec.format,
                path=source.path,
                sha256=source.sha256,
                num_records=len(source.records),
                license=source.license,
                pinned=source.pinned,
            )
        )


def _drop_eval_overlap(corpus: _Corpus) -> None:
    """Remove training items whose normalised text equals a held-out item (checked by hash)."""
    held_out = {_text_key(r["text"]) for r in corpus.roles.get("eval_text", [])}
    held_out |= {_text_key(r["prompt"]) for r in corpus.roles.get("eval_problems", [])}
    held_out |= {_text_key(r["prompt"]) for r in corpus.roles.get("eval_dpo", [])}
    for role, key_field in (
        ("pretrain_docs", "text"),
        ("sft", "prompt"),
        ("dpo", "prompt"),
        ("distill", "prompt"),
        ("grpo", "prompt"),
    ):
        kept = [r for r in corpus.roles.get(role, []) if _text_key(r[key_field]) not in held_out]
        dropped = len(corpus.roles.get(role, [])) - len(kept)
        if dropped:
            logger.warning(
                "dropped %d %s records that duplicate held-out eval items", dropped, role
            )
        corpus.roles[role] = kept


def _with_ids(role: str, records: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"id": f"{role}-{i:07d}", **r} for i, r in enumerate(records)]


def _training_texts(corpus: _Corpus) -> list[str]:
    texts = [r["text"] for r in corpus.roles.get("pretrain_docs", [])]
    for r in corpus.roles.get("sft", []):
        texts += [r["prompt"], r["response"]]
    for r in corpus.roles.get("dpo", []):
        texts += [r["prompt"], r["chosen"], r["rejected"]]
    for r in corpus.roles.get("distill", []):
        texts += [r["prompt"], format_reasoning(r["reasoning"], r["answer"])]
    texts += [r["prompt"] for r in corpus.roles.get("grpo", [])]
    return texts


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> DatasetEntry:
    lines = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records)
    data = lines.encode("utf-8")
    write_bytes_atomic(path, data)
    return DatasetEntry(
        path=path.name, sha256=sha256_bytes(data), size=len(data), num_records=len(records)
    )


def _swap_in(tmp_dir: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` with ``tmp_dir`` using renames (the old folder is removed last)."""
    old_dir = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old_dir, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old_dir)
    os.replace(tmp_dir, out_dir)
    shutil.rmtree(old_dir, ignore_errors=True)


def build_data(
    params: DataParams, *, seed: int, project_dir: Path, progress: Progress | None = None
) -> DataManifest:
    """Run the data stage into ``params.out_dir``; return the manifest it wrote."""
    say = progress or (lambda _msg: None)
    out_dir = project_dir / params.out_dir
    tmp_dir = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    # The folders made here for the temp folder (e.g. artifacts/) go again if the stage fails.
    made = [p for p in tmp_dir.parents if p.is_relative_to(project_dir) and not p.exists()]
    tmp_dir.mkdir(parents=True)
    try:
        say("generating and importing the corpus")
        corpus = _Corpus()
        _add_synthetic(corpus, params, seed)
        _add_imports(corpus, params, project_dir)
        _drop_eval_overlap(corpus)
        if not corpus.roles.get("pretrain_docs"):
            raise DataError(
                "no pretraining documents: raise data.synthetic.num_stories or add "
                "an import with role pretrain."
            )
        manifest = _write_outputs(
            corpus,
            params,
            seed=seed,
            out_dir=tmp_dir,
            # Survives a kill: a rerun with the same inputs keeps the complete shards in it.
            work_dir=out_dir.with_name(f".{out_dir.name}.partial"),
            project_dir=project_dir,
            say=say,
        )
        _swap_in(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        for folder in made:  # innermost first; a folder something else wrote into stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return manifest


def _tokenizer(
    corpus: _Corpus, params: DataParams, *, out_dir: Path, project_dir: Path, say: Progress
) -> tuple[Tokenizer, str | None, str, PinnedSource | None]:
    """The tokenizer (trained, or the pinned one of ``data.tokenizer.from``), its bos and eos."""
    spec = params.tokenizer.from_
    if spec is None:
        say("training the tokenizer")
        tokenizer = train_tokenizer(_training_texts(corpus), vocab_size=params.vocab_size)
        save_tokenizer(tokenizer, out_dir / "tokenizer", model_max_length=params.seq_len)
        return tokenizer, BOS, EOS, None
    say(f"fetching the tokenizer {spec}")
    what = "data.tokenizer.from"
    folder, pinned = fetch_tokenizer(
        spec,
        allow_floating=params.tokenizer.allow_floating_revision,
        project_dir=project_dir,
        what=what,
    )
    used = use_tokenizer(folder, pinned, out_dir / "tokenizer", what=what)
    return used.tokenizer, used.bos, used.eos, pinned


def _write_outputs(
    corpus: _Corpus,
    params: DataParams,
    *,
    seed: int,
    out_dir: Path,
    work_dir: Path,
    project_dir: Path,
    say: Progress,
) -> DataManifest:
    tokenizer, bos, eos, tokenizer_source = _tokenizer(
        corpus, params, out_dir=out_dir, project_dir=project_dir, say=say
    )
    write_json(out_dir / "tokenizer_probe.json", make_probe(tokenizer))
    say("tokenizing and packing")
    docs = _with_ids("doc", corpus.roles["pretrain_docs"])
    bos_id = None if bos is None else tokenizer.token_to_id(bos)
    eos_id = tokenizer.token_to_id(eos)
    assert eos_id is not None, "the eos token is in the vocabulary (checked on load)"
    packed = pack_documents(
        docs,
        tokenizer=tokenizer,
        bos_id=bos_id,
        eos_id=eos_id,
        seq_len=params.seq_len,
        seqs_per_shard=params.seqs_per_shard,
        num_proc=params.num_proc,
        work_dir=work_dir,
    )
    if packed.resumed_shards:
        logger.info("resumed packing after %d complete shards", packed.resumed_shards)
    os.replace(work_dir / SHARD_DIR, out_dir / SHARD_DIR)
    os.replace(packed.docs_path, out_dir / DOCS_FILE)
    shutil.rmtree(work_dir, ignore_errors=True)
    shards = packed.shards
    docs_path = out_dir / DOCS_FILE
    datasets = {
        "pretrain_docs": DatasetEntry(
            path=DOCS_FILE,
            sha256=sha256_file(docs_path),
            size=docs_path.stat().st_size,
            num_records=len(docs),
        )
    }
    id_prefixes = {"eval_text": "eval", "eval_problems": "evalp", "eval_dpo": "evald"}
    for role in ("sft", "dpo", "distill", "grpo", "eval_text", "eval_problems", "eval_dpo"):
        records = _with_ids(id_prefixes.get(role, role), corpus.roles.get(role, []))
        datasets[role] = _write_jsonl(out_dir / f"{role}.jsonl", records)
    tok_files = hash_folder(out_dir / "tokenizer")
    body = {
        "seed": seed,
        "seq_len": params.seq_len,
        "vocab_size": tokenizer.get_vocab_size(),
        "tokenizer_dir": "tokenizer",
        "tokenizer_sha256": sha256_tree(tok_files),
        "tokenizer_source": tokenizer_source,
        "tokenizer_files": [
            FileEntry(
                path=f"tokenizer/{p}", size=(out_dir / "tokenizer" / p).stat().st_size, sha256=d
            )
            for p, d in sorted(tok_files.items())
        ],
        "shards": shards,
        "datasets": datasets,
        "sources": corpus.sources,
        "num_pretrain_seqs": packed.num_seqs,
        "num_pretrain_tokens": packed.num_seqs * params.seq_len,
        "order_algorithm": ORDER_ALGORITHM,
    }
    draft = DataManifest.model_validate({**body, "data_digest": "sha256:" + "0" * 64})
    digest = sha256_json(draft.model_dump(mode="json", exclude={"data_digest"}))
    manifest = draft.model_copy(update={"data_digest": digest})
    write_json(out_dir / STAGE_MANIFEST, manifest)
    return manifest


def run_data_stage(
    params: PipelineParams, *, project_dir: Path, progress: Progress | None = None
) -> DataManifest:
    """The DVC `data` stage: build the data and record the run (MLflow + record.json)."""
    from openrelease.manifest import InputRecord
    from openrelease.record.tracking import StageTracker

    out_dir = project_dir / params.data.out_dir
    tracker = StageTracker("data", params=params, project_dir=project_dir, out_dir=out_dir)
    manifest = build_data(params.data, seed=params.seed, project_dir=project_dir, progress=progress)
    inputs = [
        InputRecord(name=s.name, kind=s.kind, path=s.path or "synthetic", digest=s.sha256)
        for s in manifest.sources
    ]
    if manifest.tokenizer_source is not None:
        pinned = manifest.tokenizer_source
        inputs.append(
            InputRecord(name="tokenizer", kind="tokenizer", path=pinned.uri, digest=pinned.digest)
        )
    tracker.start(inputs)
    tracker.log_metrics(
        {
            "num_pretrain_seqs": manifest.num_pretrain_seqs,
            "num_pretrain_tokens": manifest.num_pretrain_tokens,
            **{f"num_{k}": v.num_records for k, v in manifest.datasets.items()},
        },
        step=0,
    )
    tracker.finish()
    tracker.send()
    return manifest
