"""Build a small, valid release bundle in the DESIGN.md layout for tests (no torch).

`make_bundle(root)` writes ``root/release`` and returns it. Weights are tiny numpy tensors
saved with ``safetensors.numpy``; the tokenizer is a real `tokenizers` BPE. Every file is listed
in MANIFEST.json, written last. `write_manifest` re-lists a bundle after a test edits it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from openrelease.digest import sha256_bytes, sha256_file, sha256_tree
from openrelease.manifest import (
    BundleManifest,
    CheckpointMeta,
    FileEntry,
    TokenizerProbe,
    write_json,
    write_text_atomic,
)

BUNDLE_NAME = "tiny-open-llm"
CREATED = "2025-01-01T00:00:00Z"
PROBE_TEXT = "openrelease probe: The quick brown fox jumps over 13 lazy dogs."
CHECKPOINT_EVERY = 10
VOCAB_SIZE = 300
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tiny model learns to count: 1 + 1 = 2, 2 + 2 = 4, 13 + 4 = 17.",
    "Open releases publish weights, data, code and every checkpoint.",
    "The lazy dogs sleep while the quick brown fox runs over the hill.",
    "openrelease probe text: verify re-encodes this and compares token ids.",
] * 4

README = """---
license: apache-2.0
library_name: transformers
datasets:
- tiny-open-llm-data
tags:
- openrelease
model-index:
- name: tiny-open-llm
  results: []
---
# tiny-open-llm

A test release built by `tests/bundle_factory.py`.
"""

MOF_YAML = """framework:
  name: Model Openness Framework
  version: '1.0'
  date: '2024-12-15'
release:
  name: tiny-open-llm
  version: 1M
  date: '2025-01-01'
  type: language
  architecture: transformer decoder
  origin: none
  producer: openrelease tests
  contact: ''
  repository: https://example.com/tiny-open-llm
  huggingface: https://huggingface.co/tester/tiny-open-llm
  license:
    distribution:
      name: Apache-2.0
      path: LICENSES/Apache-2.0.txt
  components:
  - name: Model architecture
    description: Model config
    component_path: model/config.json
    license: Apache-2.0
    license_path: LICENSES/Apache-2.0.txt
  - name: Model parameters (Final)
    description: Final weights
    component_path: model/model.safetensors
    license: Apache-2.0
    license_path: LICENSES/Apache-2.0.txt
  - name: Model parameters (Intermediate)
    description: Every intermediate checkpoint
    component_path: checkpoints/
    license: Apache-2.0
    license_path: LICENSES/Apache-2.0.txt
  - name: Training code
    description: Training source
    component_path: code/train.py
    license: Apache-2.0
    license_path: LICENSES/Apache-2.0.txt
  - name: Datasets
    description: Data card
    component_path: data/croissant.json
    license: Apache-2.0
    license_path: LICENSES/Apache-2.0.txt
  - name: Evaluation results
    description: Eval results
    component_path: evals/results.json
    license: Apache-2.0
    license_path: LICENSES/Apache-2.0.txt
  - name: Technical report
    description: Report generated from the record
    component_path: docs/report.md
    license: Apache-2.0
    license_path: LICENSES/Apache-2.0.txt
"""

APACHE_NOTICE = """Apache License
Version 2.0, January 2004
http://www.apache.org/licenses/

(Abbreviated for tests: the full text is at the address above.)
"""


def _config() -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 8,
        "intermediate_size": 16,
        "model_type": "llama",
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": VOCAB_SIZE,
    }


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.embed_tokens.weight": rng.standard_normal((VOCAB_SIZE, 8), dtype=np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((16, 8), dtype=np.float32),
        "model.norm.weight": np.ones(8, dtype=np.float16),
        "lm_head.weight": rng.standard_normal((VOCAB_SIZE, 8), dtype=np.float32),
    }


def _tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer


def _write_model(model_dir: Path, *, seed: int) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    write_json(model_dir / "config.json", _config())
    save_file(_weights(seed), str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = _tokenizer()
    tokenizer.save(str(model_dir / "tokenizer.json"))
    probe = TokenizerProbe(text=PROBE_TEXT, ids=tuple(tokenizer.encode(PROBE_TEXT).ids))
    write_json(model_dir / "tokenizer_probe.json", probe)


def _folder_entries(folder: Path, *, skip: frozenset[str] = frozenset()) -> list[FileEntry]:
    return [
        FileEntry(
            path=p.relative_to(folder).as_posix(), size=p.stat().st_size, sha256=sha256_file(p)
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in skip
    ]


def write_checkpoint_meta(
    ckpt_dir: Path, *, stage: str, step: int, parent_digest: str | None
) -> CheckpointMeta:
    """(Re)write ``ckpt_dir/meta.json`` over the folder's current files; returns the meta."""
    files = tuple(_folder_entries(ckpt_dir, skip=frozenset({"meta.json"})))
    samples = step * 4
    meta = CheckpointMeta(
        stage=stage,
        step=step,
        tokens_seen=samples * 16,
        samples_seen=samples,
        sample_range=(samples - CHECKPOINT_EVERY * 4, samples),
        data_digest=sha256_bytes(f"{stage}:{step}".encode()),
        loss=round(5.0 - step / 100, 4),
        params_digest=sha256_bytes(b"params"),
        parent_digest=parent_digest,
        files=files,
        checkpoint_digest=sha256_tree({f.path: f.sha256 for f in files}),
    )
    write_json(ckpt_dir / "meta.json", meta)
    return meta


def _write_checkpoints(bundle_dir: Path, *, stages: list[tuple[str, int]], base_seed: int) -> None:
    parent: str | None = None
    seed = base_seed
    for stage, count in stages:
        for i in range(1, count + 1):
            step = i * CHECKPOINT_EVERY
            ckpt_dir = bundle_dir / "checkpoints" / stage / f"step-{step}"
            ckpt_dir.mkdir(parents=True)
            write_json(ckpt_dir / "config.json", _config())
            save_file(_weights(seed), str(ckpt_dir / "model.safetensors"))
            seed += 1
            parent = write_checkpoint_meta(
                ckpt_dir, stage=stage, step=step, parent_digest=parent
            ).checkpoint_digest


def write_manifest(bundle_dir: Path) -> BundleManifest:
    """(Re)write MANIFEST.json over every file except itself and ``signatures/**``."""
    entries = [
        e
        for e in _folder_entries(bundle_dir, skip=frozenset({"MANIFEST.json"}))
        if not e.path.startswith("signatures/")
    ]
    manifest = BundleManifest(
        name=BUNDLE_NAME,
        created=CREATED,
        files=tuple(entries),
        bundle_digest=sha256_tree({e.path: e.sha256 for e in entries}),
    )
    write_json(bundle_dir / "MANIFEST.json", manifest)
    return manifest


def make_bundle(root: Path, *, num_checkpoints: int = 2, num_sft_checkpoints: int = 0) -> Path:
    """Write a small valid release bundle at ``root/release`` and return its path.

    Args:
        root: Parent folder (e.g. pytest's ``tmp_path``); ``root/release`` must not exist.
        num_checkpoints: Pretrain checkpoints, at steps 10, 20, ...
        num_sft_checkpoints: SFT checkpoints; the first one's parent is the last pretrain one.
    """
    bundle_dir = root / "release"
    bundle_dir.mkdir(parents=True)
    write_text_atomic(bundle_dir / "README.md", README)
    write_text_atomic(bundle_dir / "mof.yaml", MOF_YAML)
    write_text_atomic(bundle_dir / "LICENSES" / "Apache-2.0.txt", APACHE_NOTICE)
    _write_model(bundle_dir / "model", seed=1000)
    stages = [("pretrain", num_checkpoints)]
    if num_sft_checkpoints:
        stages.append(("sft", num_sft_checkpoints))
    _write_checkpoints(bundle_dir, stages=stages, base_seed=1)
    final_stage, final_count = stages[-1]
    final = bundle_dir / "checkpoints" / final_stage / f"step-{final_count * CHECKPOINT_EVERY}"
    for name in ("config.json", "model.safetensors"):  # model/ is the final checkpoint
        shutil.copyfile(final / name, bundle_dir / "model" / name)
    write_json(
        bundle_dir / "data" / "croissant.json",
        {"@type": "sc:Dataset", "name": f"{BUNDLE_NAME}-data", "license": "Apache-2.0"},
    )
    write_json(bundle_dir / "data" / "shards.json", {"shards": []})
    write_text_atomic(bundle_dir / "code" / "train.py", "print('train')\n")
    write_text_atomic(bundle_dir / "configs" / "params.yaml", "seed: 0\n")
    write_json(bundle_dir / "evals" / "results.json", {"pretrain": {"loss": 4.8}})
    write_text_atomic(bundle_dir / "docs" / "report.md", "# Technical report\n")
    write_manifest(bundle_dir)
    return bundle_dir


def manifest_dict(bundle_dir: Path) -> dict[str, object]:
    """MANIFEST.json as a plain dict (for tests that tamper with it)."""
    data: dict[str, object] = json.loads((bundle_dir / "MANIFEST.json").read_text())
    return data
