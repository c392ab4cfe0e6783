"""The data stage's tokenizer: a trained byte-level BPE, or an existing one, pinned.

`train_tokenizer`/`save_tokenizer` make the default BPE as a transformers tokenizer folder;
`fetch_tokenizer`/`use_tokenizer` take an existing fast tokenizer from the Hub
(``hf:ORG/NAME@SHA``, every file checked against the Hub's digests) or a local folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from openrelease.data import hub
from openrelease.digest import sha256_bytes, sha256_tree
from openrelease.errors import ArtifactError, DataError
from openrelease.layout import Workspace
from openrelease.manifest import PinnedSource, TokenizerProbe, write_bytes_atomic

logger = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, "<think>", "</think>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|eos|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROBE_TEXT = (
    "openrelease probe: The quick brown fox jumps over 13 lazy dogs. "
    "<|user|>What is 2 + 2?<|assistant|><think>2 + 2 = 4.</think> The answer is 4.<|eos|>"
)


def train_tokenizer(texts: Iterable[str], *, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on ``texts``; special tokens get the first ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path, *, model_max_length: int) -> None:
    """Save as a `PreTrainedTokenizerFast` folder with our special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT, "<think>", "</think>"],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def make_probe(tokenizer: Tokenizer) -> TokenizerProbe:
    """Encode the fixed probe text; verify re-encodes it to check the tokenizer is intact."""
    return TokenizerProbe(text=PROBE_TEXT, ids=tuple(tokenizer.encode(PROBE_TEXT).ids))


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
"""The files of a fast transformers tokenizer that `use_tokenizer` takes from a folder or repo."""


def _token_of(config: dict[str, object], name: str) -> str | None:
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def fetch_tokenizer(
    spec: str, *, allow_floating: bool, project_dir: Path, what: str
) -> tuple[Path, PinnedSource]:
    """Pin the tokenizer ``spec`` names (``hf:ORG/NAME@REV`` or a folder); fetch and check it.

    Returns:
        The folder holding its files and the record of every file used (sha256 each).

    Raises:
        DataError: The source has no tokenizer.json (a fast tokenizer is needed).
        ArtifactError: A file does not have the Hub's digest, or the fetch failed.
    """
    if hub.is_hub_spec(spec):
        snapshot = hub.resolve_spec(
            spec, repo_type="model", allow_floating=allow_floating, what=what
        )
        files = hub.select(snapshot, TOKENIZER_FILES)
        if "tokenizer.json" not in {f.path for f in files}:
            raise DataError(
                f"{what}: {snapshot.repo}@{snapshot.commit[:12]} has no tokenizer.json; pick a "
                "repo with a fast (tokenizers) tokenizer."
            )
        dest = Workspace(project_dir).hub_snapshot("model", snapshot.repo, snapshot.commit)
        entries = hub.fetch(snapshot, files, dest=dest, what=what)
        return dest, hub.pin_hub(snapshot, entries)
    folder = project_dir / spec
    if not (folder / "tokenizer.json").is_file():
        raise DataError(
            f"{what}: {spec}/tokenizer.json is missing; give a folder saved by a fast "
            "transformers tokenizer or hf:ORG/NAME@SHA."
        )
    pinned = hub.pin_local(folder, rel=spec, what=what)
    kept = tuple(e for e in pinned.files if e.path in TOKENIZER_FILES)
    return folder, pinned.model_copy(
        update={"files": kept, "digest": sha256_tree({e.path: e.sha256 for e in kept})}
    )


@dataclass(frozen=True)
class UsedTokenizer:
    """An existing tokenizer installed into the data folder."""

    tokenizer: Tokenizer
    bos: str | None
    """None: documents are packed as ``doc <eos>`` (tokenizers without a bos token)."""
    eos: str


def use_tokenizer(folder: Path, pinned: PinnedSource, out_dir: Path, *, what: str) -> UsedTokenizer:
    """Copy the pinned tokenizer files into ``out_dir`` (checked again) and load it.

    Raises:
        DataError: The tokenizer has no eos token (needed to pack documents).
        ArtifactError: A file changed since it was pinned.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for entry in pinned.files:
        data = (folder / entry.path).read_bytes()
        if sha256_bytes(data) != entry.sha256:
            raise ArtifactError(
                f"{what}: {folder / entry.path} changed after it was checked; run again."
            )
        write_bytes_atomic(out_dir / entry.path, data)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    eos, bos = _token_of(config, "eos_token"), _token_of(config, "bos_token")
    if eos is None or tokenizer.token_to_id(eos) is None:
        raise DataError(
            f"{what}: the tokenizer has no eos_token in tokenizer_config.json; documents are "
            "packed as <bos> doc <eos>, so pick a tokenizer that has one."
        )
    if bos is not None and tokenizer.token_to_id(bos) is None:
        bos = None
    if "chat_template" not in config and not (out_dir / "chat_template.jinja").is_file():
        logger.warning(
            "%s: the tokenizer has no chat template; sft and later stages need one", what
        )
    return UsedTokenizer(tokenizer=tokenizer, bos=bos, eos=eos)
