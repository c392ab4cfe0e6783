"""The model builder: every arch builds, records its config, and round-trips through HF."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from openrelease.params import ModelParams
from openrelease.train.model import (
    SpecialTokens,
    build_model,
    count_params,
    decoder_layers,
    flops_per_token,
    save_model_config,
)


def _params(**kw: object) -> ModelParams:
    base: dict[str, object] = {
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
    }
    return ModelParams.model_validate({**base, **kw})


@pytest.mark.parametrize(
    ("arch", "cls_name"),
    [
        ("llama", "LlamaForCausalLM"),
        ("mistral", "MistralForCausalLM"),
        ("qwen2", "Qwen2ForCausalLM"),
    ],
)
def test_every_arch_builds_and_runs(arch: str, cls_name: str) -> None:
    extra = {"sliding_window": 64} if arch == "mistral" else {}
    torch.manual_seed(0)
    model = build_model(_params(arch=arch, **extra), vocab_size=300)
    assert type(model).__name__ == cls_name
    assert model.config.num_key_value_heads == 2
    assert len(decoder_layers(model)) == 2
    logits = model(torch.arange(10)[None], use_cache=False).logits
    assert logits.shape == (1, 10, 300)
    assert logits.dtype == torch.float32


def test_same_seed_same_weights_and_tied_embeddings() -> None:
    torch.manual_seed(7)
    a = build_model(_params(), vocab_size=300)
    torch.manual_seed(7)
    b = build_model(_params(), vocab_size=300)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    tied = build_model(_params(tie_word_embeddings=True), vocab_size=300)
    assert count_params(tied) == count_params(a) - 300 * 32


def test_config_round_trips_through_from_pretrained(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = build_model(_params(rope_theta=5000.0), vocab_size=300, special=SpecialTokens(0, 1, 2))
    save_model_config(model.config, tmp_path)
    model.save_pretrained(str(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert loaded.config.eos_token_id == 1
    assert loaded.generation_config.pad_token_id == 2
    ids = torch.arange(12)[None]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model.eval()(ids).logits)


def test_flops_per_token_counts_matmuls_and_attention() -> None:
    p = _params()
    model = build_model(p, vocab_size=300)
    embed = 300 * 32
    norms = 32 * (2 * 2 + 1)
    assert flops_per_token(p, vocab_size=300, seq_len=0) == 6.0 * (
        count_params(model) - embed - norms
    )
    assert flops_per_token(p, vocab_size=300, seq_len=10) - flops_per_token(
        p, vocab_size=300, seq_len=0
    ) == pytest.approx(6.0 * 2 * 10 * 32)
