"""The model: a transformers causal LM (Llama, Mistral or Qwen2 flavour) built from ModelParams.

Owns the architecture and its FLOP count; sharding lives in train/distributed.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from openrelease.errors import ArtifactError
from openrelease.params import ModelParams

_FAMILIES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the model config and generation config record."""

    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None


def build_config(
    params: ModelParams, *, vocab_size: int, special: SpecialTokens | None = None
) -> PretrainedConfig:
    """Return the transformers config of the model ``params`` describe.

    Args:
        params: The ``model`` section of params.yaml.
        vocab_size: Rows of the embedding matrix (the tokenizer's vocabulary size).
        special: bos/eos/pad token ids to record in the config.

    Returns:
        A LlamaConfig, MistralConfig or Qwen2Config (fp32, sdpa attention).
    """
    ids = special or SpecialTokens()
    config_cls, _ = _FAMILIES[params.arch]
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": params.hidden_size,
        "intermediate_size": params.intermediate_size,
        "num_hidden_layers": params.num_layers,
        "num_attention_heads": params.num_heads,
        "num_key_value_heads": params.num_kv_heads,
        "max_position_embeddings": params.max_position_embeddings,
        "rope_theta": params.rope_theta,
        "rms_norm_eps": params.rms_norm_eps,
        "tie_word_embeddings": params.tie_word_embeddings,
        "attention_dropout": params.dropout,
        "initializer_range": params.init_std,
        "bos_token_id": ids.bos_token_id,
        "eos_token_id": ids.eos_token_id,
        "pad_token_id": ids.pad_token_id,
    }
    if params.arch == "mistral":
        kwargs["sliding_window"] = params.sliding_window
    elif params.arch == "qwen2":
        kwargs["use_sliding_window"] = False
    config = config_cls(**kwargs)
    config.architectures = [_FAMILIES[params.arch][1].__name__]
    config.dtype = torch.float32
    config._attn_implementation = "sdpa"
    return config


def save_model_config(config: PretrainedConfig, folder: Path) -> None:
    """Write config.json and generation_config.json (bos/eos/pad from ``config``) to ``folder``."""
    config.save_pretrained(str(folder))
    generation = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    generation.save_pretrained(str(folder))


def build_model(
    params: ModelParams, *, vocab_size: int, special: SpecialTokens | None = None
) -> PreTrainedModel:
    """Build a freshly initialised fp32 causal LM from ``params``.

    The weights come from torch's global RNG: seed it identically on every rank first, because
    FSDP2 shards the locally initialised full parameters.

    Args:
        params: The ``model`` section of params.yaml.
        vocab_size: Rows of the embedding matrix.
        special: bos/eos/pad token ids to record in the config.

    Returns:
        The model in training mode, on CPU, in float32.
    """
    config = build_config(params, vocab_size=vocab_size, special=special)
    # Any: transformers' typing of model classes and their config argument varies by release.
    model_cls: Any = _FAMILIES[params.arch][1]
    built: Any = model_cls(config)
    torch.nn.Module.float(built)
    built.train()
    model: PreTrainedModel = built
    return model


def load_pretrained(
    folder: Path, *, vocab_size: int, special: SpecialTokens | None = None
) -> PreTrainedModel:
    """Load an existing causal LM (any architecture transformers knows) from a local folder.

    The architecture comes from the folder's config.json, the weights from its safetensors
    (never pickles, never remote code). The config's bos/eos/pad ids are set to ``special``,
    the ids of the tokenizer the stage trains with.

    Args:
        folder: A transformers model folder (a fetched base model or a release checkpoint).
        vocab_size: Tokens of the stage's tokenizer; the embedding must have that many rows.
        special: bos/eos/pad token ids to record in the config.

    Returns:
        The model in training mode, on CPU, in float32.

    Raises:
        ArtifactError: transformers cannot load the folder, or its vocabulary is too small.
    """
    from transformers import AutoModelForCausalLM

    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            str(folder),
            dtype=torch.float32,
            attn_implementation="sdpa",
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=False,
        )
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ArtifactError(
            f"{folder}: transformers cannot load this causal LM ({first}); give a "
            "safetensors model folder of an architecture transformers supports."
        ) from None
    rows = int(loaded.get_input_embeddings().num_embeddings)
    if rows < vocab_size:
        raise ArtifactError(
            f"{folder}: the model embeds {rows} tokens but the data's tokenizer has "
            f"{vocab_size}; use the model's tokenizer (data.tokenizer.from)."
        )
    ids = special or SpecialTokens()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(loaded.config, name, getattr(ids, name))
    torch.nn.Module.float(loaded)
    loaded.train()
    model: PreTrainedModel = loaded
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of a causal LM (the FSDP2 sharding units).

    ``model.layers`` for Llama, Mistral, Qwen2 and most others; otherwise the module list
    with ``config.num_hidden_layers`` entries (GPT-2's ``transformer.h``, ...).
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return list(layers)
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return list(module)
    raise TypeError(f"{type(model).__name__} has no decoder layer stack")


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def flops_per_token(params: ModelParams, *, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding-lookup params plus causal attention.

    Counts the matmul weights (attention, MLP, LM head; not the input embedding lookup) at 6
    FLOPs each, plus 6 * layers * seq_len * hidden for the causal attention scores and values
    (12 * L * s * h halved by the causal mask), as in the PaLM appendix.
    """
    h, layers = params.hidden_size, params.num_layers
    head_dim = h // params.num_heads
    kv = params.num_kv_heads * head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * params.intermediate_size
    matmul_params = layers * per_layer + h * vocab_size
    return 6.0 * matmul_params + 6.0 * layers * seq_len * h
