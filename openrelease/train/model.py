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


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of a Llama/Mistral/Qwen2 causal LM (the FSDP2 sharding units)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no model.layers decoder stack")
    return list(layers)


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
