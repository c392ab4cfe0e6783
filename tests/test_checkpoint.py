"""Checkpoints: HF release folders with meta.json, DCP training states, atomicity under SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from openrelease.data.store import DataStore
from openrelease.digest import sha256_file, sha256_tree
from openrelease.errors import ArtifactError
from openrelease.manifest import CheckpointFacts, CheckpointMeta
from openrelease.params import ComputeParams, ModelParams
from openrelease.train import checkpoint as ckpt
from openrelease.train import distributed
from openrelease.train.model import SpecialTokens, build_model, save_model_config

MODEL = ModelParams(
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    num_kv_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
)


def _info(step: int, parent: str | None = None) -> CheckpointFacts:
    return CheckpointFacts(
        stage="pretrain",
        step=step,
        tokens_seen=step * 512,
        samples_seen=step * 8,
        sample_range=((step - 1) * 8, step * 8),
        data_digest="sha256:" + "a" * 64,
        loss=5.0 - step / 10,
        params_digest="sha256:" + "b" * 64,
        parent_digest=parent,
    )


def _write(root: Path, model: torch.nn.Module, tokenizer_dir: Path, step: int) -> CheckpointMeta:
    config = model.config
    return ckpt.write_release_checkpoint(
        root / "artifacts/pretrain/checkpoints",
        state_dict=model.state_dict(),
        save_config=lambda folder: save_model_config(config, folder),
        tokenizer_dir=tokenizer_dir,
        info=_info(step),
    )


def test_release_checkpoint_is_a_loadable_hf_folder(tmp_path: Path, data_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = DataStore(data_dir).tokenizer_dir
    torch.manual_seed(0)
    model = build_model(MODEL, vocab_size=320, special=SpecialTokens(0, 1, 2)).eval()
    meta = _write(tmp_path, model, tokenizer_dir, 4)
    folder = tmp_path / "artifacts/pretrain/checkpoints/step-4"
    on_disk = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "meta.json"} <= on_disk
    assert {p.name for p in tokenizer_dir.iterdir()} <= on_disk
    listed = {f.path: f.sha256 for f in meta.files}
    assert set(listed) == on_disk - {"meta.json"}
    assert all(sha256_file(folder / p) == d for p, d in listed.items())
    assert meta.checkpoint_digest == sha256_tree(listed)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.arange(16)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert AutoTokenizer.from_pretrained(str(folder)).pad_token == "<|pad|>"

    manifest = ckpt.write_stage_manifest(tmp_path, stage="pretrain")
    assert manifest.final_checkpoint == "artifacts/pretrain/checkpoints/step-4"
    found, final = ckpt.final_checkpoint(tmp_path, "pretrain")
    assert (found, final) == (folder, meta)


def test_missing_stage_manifest_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="openrelease train pretrain"):
        ckpt.final_checkpoint(tmp_path, "pretrain")
    with pytest.raises(ArtifactError, match="holds no checkpoint"):
        ckpt.write_stage_manifest(tmp_path, stage="pretrain")


@pytest.fixture
def one_rank() -> Iterator[distributed.DistContext]:
    ctx = distributed.init_distributed(
        ComputeParams(device="cpu", launcher="python", deterministic=True)
    )
    try:
        yield ctx
    finally:
        distributed.teardown()


def _sharded(ctx: distributed.DistContext) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = distributed.shard_model(
        build_model(MODEL, vocab_size=320), ctx, ComputeParams(device="cpu")
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    loss = model(torch.randint(0, 320, (2, 16)), use_cache=False).logits.float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_state_round_trip_restores_model_optimizer_and_rng(
    tmp_path: Path, one_rank: distributed.DistContext
) -> None:
    states = tmp_path / "states"
    model, opt = _sharded(one_rank)
    for step in (1, 2, 3):
        _step(model, opt)
        ckpt.save_state(
            states, step=step, model=model, optimizer=opt, info={"step": step}, keep_last=2
        ).finish()
    assert sorted(p.name for p in states.iterdir()) == ["step-2", "step-3"]
    (states / ".tmp-step-4").mkdir()  # an interrupted write is never "latest"
    assert ckpt.latest_state(states) == states / "step-3"
    expected_next = torch.rand(3)
    _step(model, opt)
    _step(model, opt)
    want = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}

    fresh, fresh_opt = _sharded(one_rank)
    info = ckpt.load_state(states / "step-3", model=fresh, optimizer=fresh_opt)
    assert info == {"step": 3}
    assert torch.equal(torch.rand(3), expected_next)
    _step(fresh, fresh_opt)
    _step(fresh, fresh_opt)
    got = {k: v.full_tensor() for k, v in fresh.state_dict().items()}
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert ckpt.remove_partial(states) == [states / ".tmp-step-4"]


WRITER = """\
import sys
from pathlib import Path

import torch

from openrelease.manifest import CheckpointFacts
from openrelease.train.checkpoint import write_release_checkpoint

root, tok = Path(sys.argv[1]), Path(sys.argv[2])
big = {f"w{i}": torch.zeros(4096, 4096) for i in range(16)}  # 1 GiB: slow enough to interrupt
info = CheckpointFacts(
    stage="pretrain", step=8, tokens_seen=0, samples_seen=0, sample_range=(0, 8),
    data_digest="sha256:" + "a" * 64, loss=None, params_digest="sha256:x", parent_digest=None,
)
write_release_checkpoint(
    root, state_dict=big, save_config=lambda d: None, tokenizer_dir=tok, info=info
)
"""


@pytest.mark.slow
def test_sigkill_during_a_write_keeps_the_previous_checkpoint(
    tmp_path: Path, data_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer_dir = DataStore(data_dir).tokenizer_dir
    model = build_model(MODEL, vocab_size=320).eval()
    first = _write(tmp_path, model, tokenizer_dir, 4)
    root = tmp_path / "artifacts/pretrain/checkpoints"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(tokenizer_dir)])
    partial = root / ".tmp-step-8" / "model.safetensors"
    deadline = time.monotonic() + 60
    while not partial.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "the writer finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    assert not (root / "step-8").exists()
    assert ckpt.list_checkpoints(root) == [first]
    folder = root / "step-4"
    assert all(sha256_file(folder / f.path) == f.sha256 for f in first.files)
    AutoModelForCausalLM.from_pretrained(str(folder))
    assert ckpt.remove_partial(root) == [root / ".tmp-step-8"]
    assert ckpt.write_stage_manifest(tmp_path, stage="pretrain").final_step == 4
