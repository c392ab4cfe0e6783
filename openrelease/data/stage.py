"""`openrelease data`: build the corpus, split it, train the tokenizer, pack and write manifests.

The whole output folder is built beside the target and swapped in at the end, so a crash never
leaves a half-written data folder. Every role streams through it as files (`corpus` gathers
the pretraining documents and writes the other roles' files, the tokenizer trains on them read
back and `pack` reads the documents back), so the stage's memory does not grow with the number
of records; what still does, slowly: the held-out digests (see `corpus`), the BPE trainer's
table of distinct words, and one manifest entry per shard.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from tokenizers import Tokenizer

from openrelease.data.corpus import Corpus, gather_corpus
from openrelease.data.order import ORDER_ALGORITHM
from openrelease.data.pack import DOCS_FILE, SHARD_DIR, pack_documents
from openrelease.data.records import iter_records
from openrelease.data.tasks import format_reasoning
from openrelease.data.tokenizer import (
    BOS,
    EOS,
    fetch_tokenizer,
    make_probe,
    save_tokenizer,
    train_tokenizer,
    use_tokenizer,
)
from openrelease.digest import hash_folder, sha256_file, sha256_json, sha256_tree
from openrelease.errors import DataError
from openrelease.layout import STAGE_MANIFEST
from openrelease.manifest import (
    DataManifest,
    DatasetEntry,
    FileEntry,
    PinnedSource,
    write_json,
)
from openrelease.params import DataParams, PipelineParams

logger = logging.getLogger(__name__)
Progress = Callable[[str], None]


def _training_texts(corpus: Corpus) -> Iterator[str]:
    """The texts the tokenizer trains on: the documents, then the small roles' (read back)."""
    yield from (r["text"] for r in iter_records(corpus.docs_path))
    for r in corpus.records("sft"):
        yield from (r["prompt"], r["response"])
    for r in corpus.records("dpo"):
        yield from (r["prompt"], r["chosen"], r["rejected"])
    for r in corpus.records("distill"):
        yield from (r["prompt"], format_reasoning(r["reasoning"], r["answer"]))
    yield from (r["prompt"] for r in corpus.records("grpo"))


def _datasets(corpus: Corpus, out_dir: Path) -> dict[str, DatasetEntry]:
    """The entries of every dataset: the packed documents' and those the corpus wrote."""
    docs_path = out_dir / DOCS_FILE
    docs = DatasetEntry(
        path=DOCS_FILE,
        sha256=sha256_file(docs_path),
        size=docs_path.stat().st_size,
        num_records=corpus.num_docs,
    )
    roles = ("sft", "dpo", "distill", "grpo", "eval_text", "eval_problems", "eval_dpo")
    return {"pretrain_docs": docs, **{role: corpus.datasets[role] for role in roles}}


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
        corpus = gather_corpus(params, seed=seed, project_dir=project_dir, out_dir=tmp_dir)
        if not corpus.num_docs:
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
    corpus: Corpus, params: DataParams, *, out_dir: Path, project_dir: Path, say: Progress
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
    corpus: Corpus,
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
    bos_id = None if bos is None else tokenizer.token_to_id(bos)
    eos_id = tokenizer.token_to_id(eos)
    assert eos_id is not None, "the eos token is in the vocabulary (checked on load)"
    packed = pack_documents(
        corpus.docs_path,
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
    corpus.docs_path.unlink()
    os.replace(work_dir / SHARD_DIR, out_dir / SHARD_DIR)
    os.replace(packed.docs_path, out_dir / DOCS_FILE)
    shutil.rmtree(work_dir, ignore_errors=True)
    shards = packed.shards
    datasets = _datasets(corpus, out_dir)
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
