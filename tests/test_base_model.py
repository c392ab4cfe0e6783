"""Base models from the (loopback) Hub: pinned, checked file by file, loaded for any family."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hubserver import TOKEN, USER, HubServer
from huggingface_hub import HfApi
from typer.testing import CliRunner

from openrelease.cli import app
from openrelease.digest import sha256_file
from openrelease.errors import ArtifactError, ParamsError
from openrelease.manifest import CheckpointMeta, PinnedSource, StageRecord, read_model
from openrelease.params import load_params
from openrelease.train import main_from_cli
from openrelease.train.base_model import (
    cached_base_model,
    fetch_base_model,
    resolve_base_model,
)
from openrelease.train.checkpoint import final_checkpoint
from openrelease.train.model import decoder_layers, load_pretrained

VOCAB = 320
"""Rows of the tiny models' embeddings: the test tokenizer's vocabulary fits."""


def tiny_model_folder(folder: Path, arch: str, *, seed: int = 0) -> Path:
    """Save a tiny random causal LM of family ``arch`` (safetensors) with a model card."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        arch,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n# tiny {arch}\n")
    return folder


def upload_model(hub: HubServer, folder: Path, name: str) -> str:
    """Upload ``folder`` as ``tester/<name>``; return the commit sha."""
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(f"{USER}/{name}")
    api.upload_folder(repo_id=f"{USER}/{name}", folder_path=str(folder))
    return str(api.model_info(f"{USER}/{name}").sha)


@pytest.fixture
def endpoint(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    return hub


@pytest.mark.parametrize(
    ("arch", "cls"),
    [
        ("llama", "LlamaForCausalLM"),
        ("mistral", "MistralForCausalLM"),
        ("qwen2", "Qwen2ForCausalLM"),
    ],
)
def test_fetch_checks_every_file_and_loads_the_family(
    endpoint: HubServer, tmp_path: Path, arch: str, cls: str
) -> None:
    sha = upload_model(endpoint, tiny_model_folder(tmp_path / arch, arch), f"tiny-{arch}")
    ref = resolve_base_model(f"hf:{USER}/tiny-{arch}@{sha}", project_dir=tmp_path)
    assert ref.commit == sha
    folder, pinned = fetch_base_model(ref, cache_dir=tmp_path / "ws")
    assert pinned.uri == f"hf:{USER}/tiny-{arch}@{sha}"
    assert pinned.license == "apache-2.0"
    names = {f.path for f in pinned.files}
    assert {"config.json", "model.safetensors", "README.md"} <= names
    assert ".gitattributes" not in names
    for entry in pinned.files:  # the recorded digest is the file's, and LFS's for the weights
        from openrelease.digest import sha256_file

        assert sha256_file(folder / entry.path) == entry.sha256
    lfs = {r.path: r.lfs_sha256 for r in ref.snapshot.files} if ref.snapshot else {}
    weights = next(f for f in pinned.files if f.path == "model.safetensors")
    assert weights.sha256 == f"sha256:{lfs['model.safetensors']}"

    model = load_pretrained(folder, vocab_size=VOCAB - 10)
    assert type(model).__name__ == cls
    assert len(decoder_layers(model)) == 2
    with pytest.raises(ArtifactError, match="embeds 320 tokens but the data's tokenizer has 400"):
        load_pretrained(folder, vocab_size=400)


def test_tampered_files_are_refused(endpoint: HubServer, tmp_path: Path) -> None:
    sha = upload_model(endpoint, tiny_model_folder(tmp_path / "m", "llama"), "tiny")
    ref = resolve_base_model(f"hf:{USER}/tiny@{sha}", project_dir=tmp_path)
    folder, _ = fetch_base_model(ref, cache_dir=tmp_path / "ws")

    # A downloaded weights file changed on disk afterwards: refused on the next use.
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="refusing a tampered file") as err:
        fetch_base_model(ref, cache_dir=tmp_path / "ws")
    assert "model.safetensors has sha256" in str(err.value)
    assert "the Hub's LFS metadata says" in str(err.value)
    assert "\n" not in str(err.value)
    weights.write_bytes(good)
    fetch_base_model(ref, cache_dir=tmp_path / "ws")  # intact again: accepted

    # A small file stored in git: checked against the Hub's git blob sha1.
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"hidden_size": 32', '"hidden_size": 64'))
    with pytest.raises(ArtifactError, match=r"config\.json has git blob sha1"):
        fetch_base_model(ref, cache_dir=tmp_path / "ws")

    # Bytes altered in the server's LFS store are refused after download too.
    assert ref.snapshot is not None
    oid = next(r.lfs_sha256 for r in ref.snapshot.files if r.path == "model.safetensors")
    assert oid is not None
    stored = endpoint.lfs_path(endpoint.repos[("model", f"{USER}/tiny")], oid)
    stored.write_bytes(good[:100] + bytes([good[100] ^ 0x01]) + good[101:])
    tampered = r"model\.safetensors has sha256 .* refusing a tampered"
    with pytest.raises(ArtifactError, match=tampered):
        fetch_base_model(ref, cache_dir=tmp_path / "fresh")


def test_floating_revisions_are_refused_unless_allowed(
    endpoint: HubServer, tmp_path: Path, tiny_params: object
) -> None:
    sha = upload_model(endpoint, tiny_model_folder(tmp_path / "m", "qwen2"), "tiny")
    with pytest.raises(ParamsError, match="revision 'main' of tester/tiny is a branch or tag"):
        resolve_base_model(f"hf:{USER}/tiny@main", project_dir=tmp_path)
    ref = resolve_base_model(
        f"hf:{USER}/tiny@main", allow_floating_revision=True, project_dir=tmp_path
    )
    assert ref.commit == sha
    _, pinned = fetch_base_model(ref, cache_dir=tmp_path)
    assert (pinned.revision, pinned.commit, pinned.uri) == ("main", sha, f"hf:{USER}/tiny@{sha}")

    # In params, the refusal comes at load time, as one line naming the key and the fix.
    from project_paths import TEST_PARAMS

    raw = yaml.safe_load(TEST_PARAMS.read_text())
    _set_from(raw, "pretrain", f"hf:{USER}/tiny@main")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["params", "show", "--params", str(params_file)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "stages: pretrain from" in lines[0]
    assert "branch or tag" in lines[0]
    assert "allow_floating_revision: true" in lines[0]
    raw["pretrain"]["allow_floating_revision"] = True
    params_file.write_text(yaml.safe_dump(raw))
    assert load_params(params_file).spec("pretrain").from_ == f"hf:{USER}/tiny@main"
    _set_from(raw, "pretrain", "hf:no-slash@x")
    params_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"is not a Hub base model reference; write hf:ORG/NAME"):
        load_params(params_file)


def _set_from(raw: dict[str, Any], stage: str, spec: str) -> None:
    """Point ``stage``'s ``from`` in the raw params' stage list at ``spec``."""
    (entry,) = (s for s in raw["stages"] if s["name"] == stage)
    entry["from"] = spec


def _write_params(
    project: Path, from_: dict[str, str] | None = None, **stages: dict[str, object]
) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    for stage, spec in (from_ or {}).items():
        _set_from(raw, stage, spec)
    for stage, values in stages.items():
        raw[stage].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.slow
def test_pretrain_and_sft_start_from_a_pinned_hub_model(
    endpoint: HubServer, project: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    base = tiny_model_folder(tmp_path / "base", "qwen2", seed=7)
    sha = upload_model(endpoint, base, "tiny-qwen2")
    spec = f"hf:{USER}/tiny-qwen2@{sha}"
    short = {"num_steps": 2, "checkpoint_every": 2, "warmup_steps": 0}
    _write_params(project, {"pretrain": spec}, pretrain=short, sft=short)

    report = main_from_cli("pretrain", project / "params.yaml", project)
    assert report.final_step == 2
    folder, meta = final_checkpoint(project, "pretrain")
    # The architecture is the base model's (qwen2), not the model params' (llama) ...
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2"
    # ... and training started from its weights: the first checkpoint's parent is the base.
    assert meta.base_model is not None
    assert (meta.base_model.repo, meta.base_model.commit) == (f"{USER}/tiny-qwen2", sha)
    assert meta.parent_digest == meta.base_model.digest
    trained = load_file(str(folder / "model.safetensors"))
    start = load_file(str(base / "model.safetensors"))
    assert set(trained) == set(start)
    delta = max((trained[k] - start[k]).abs().max().item() for k in start)
    assert 0 < delta < 0.1  # two small steps away from the base, not a fresh init

    record = read_model(project / "artifacts/pretrain/record.json", StageRecord)
    inputs = {i.name: i for i in record.inputs}
    assert inputs["base-model"].path == spec
    assert inputs["base-model"].digest == meta.base_model.digest

    # sft starts from pretrain's checkpoint and still names the base model.
    main_from_cli("sft", project / "params.yaml", project)
    _, sft_meta = final_checkpoint(project, "sft")
    assert sft_meta.base_model == meta.base_model
    sft_inputs = {
        i.name for i in read_model(project / "artifacts/sft/record.json", StageRecord).inputs
    }
    assert {"pretrain-final", "base-model"} <= sft_inputs

    result = CliRunner().invoke(app, ["lineage", "sft", "--json"])
    assert result.exit_code == 0, result.output
    nodes = json.loads(result.output)["nodes"]
    base_nodes = [n for n in nodes if n["kind"] == "base-model"]
    assert [n["name"] for n in base_nodes] == [spec]
    assert base_nodes[0]["details"]["commit"] == sha
    kinds = [n["kind"] for n in nodes]
    assert kinds.index("base-model") < kinds.index("stage")

    # The model card names the base by reference: Hub metadata, repo, commit, file digests.
    from openrelease.data.store import DataStore
    from openrelease.manifest import StageManifest
    from openrelease.release.cards import ReleaseRecord, model_card

    params = load_params(project / "params.yaml")
    rec = ReleaseRecord(
        params=params,
        data=DataStore(project / "artifacts/data").manifest,
        stages={
            s: read_model(project / f"artifacts/{s}/manifest.json", StageManifest)
            for s in ("pretrain", "sft")
        },
        records={},
        results=[],
        version="v0",
        created="2026-01-01T00:00:00Z",
    )
    card = model_card(rec)
    front = yaml.safe_load(card.split("---")[1])
    assert (front["base_model"], front["base_model_relation"]) == (f"{USER}/tiny-qwen2", "finetune")
    assert f"fine-tuned by openrelease from `{USER}/tiny-qwen2` at `{sha}`" in card
    assert f"| pretrain | `{USER}/tiny-qwen2` at `{sha}` |" in card
    assert meta.base_model.files[-1].sha256 in card
    assert "Its weights are not part of this release" in card

    # A checked snapshot is used again without the Hub; a changed file sends it back there.
    cached = cached_base_model(spec, cache_dir=project)
    assert cached is not None and cached[1] == meta.base_model
    assert cached_base_model(f"hf:{USER}/tiny-qwen2@main", cache_dir=project) is None
    config = cached[0] / "config.json"
    original = config.read_bytes()
    config.write_bytes(original + b" ")
    assert cached_base_model(spec, cache_dir=project) is None
    config.write_bytes(original)
    pin = cached[0].with_name(f"{sha}.pin.json")
    pin_bytes = pin.read_bytes()
    pin.write_text("{not json")
    assert cached_base_model(spec, cache_dir=project) is None  # damaged: back to the Hub
    pin.write_bytes(pin_bytes)
    assert cached_base_model(spec, cache_dir=project) is not None
    assert read_model(folder / "meta.json", CheckpointMeta).base_model == meta.base_model

    _bundle_with_the_base_model(project, tmp_path, rec, meta.base_model)


def _bundle_with_the_base_model(
    project: Path, tmp_path: Path, rec: Any, pinned: PinnedSource
) -> None:
    """``release.include_base_model``: base_model/ holds the pinned files (checked), only under
    an open license; the default bundle names the base by reference only."""
    import dataclasses

    from openrelease.eval.stage import run_eval_stage
    from openrelease.release.bundle import _plan_base_model, build_bundle
    from openrelease.release.files import FilePlan
    from openrelease.reproduce.run import reproduce
    from openrelease.verify.bundle import verify_bundle

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["release"]["include_base_model"] = True
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(project / "params.yaml")
    run_eval_stage(params, project_dir=project)
    out = tmp_path / "release"
    build_bundle(project, out, params=params)
    shipped = {p.relative_to(out / "base_model").as_posix() for p in out.rglob("base_model/*")}
    assert shipped == {f.path for f in pinned.files}
    for f in pinned.files:
        assert sha256_file(out / "base_model" / f.path) == f.sha256
    assert verify_bundle(out).ok
    assert "in `base_model/`" in (out / "README.md").read_text()
    # The bundle replays from step 0 with no Hub: the replay takes the bundle's base_model/
    # files (each hashed again against the recorded pin) through its Hub cache.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
        assert reproduce(out, stage="pretrain", from_step=0, to_step=2).identical

    # A tampered Hub-cache file is not shipped on its record's word, even with its old mtime.
    cached = next(project.glob(".openrelease/hub/models/**/config.json"))
    original, stat = cached.read_bytes(), cached.stat()
    cached.write_bytes(original.replace(b"qwen2", b"QWEN2"))
    os.utime(cached, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ArtifactError, match=r"config\.json has"):
        build_bundle(project, tmp_path / "tampered", params=params)
    cached.write_bytes(original)

    # No redistribution under a license MOF does not count as open.
    closed = pinned.model_copy(update={"license": "llama3"})
    stages = {
        name: m.model_copy(
            update={
                "checkpoints": [c.model_copy(update={"base_model": closed}) for c in m.checkpoints]
            }
        )
        for name, m in rec.stages.items()
    }
    closed_rec = dataclasses.replace(rec, params=params, stages=stages)
    with pytest.raises(ParamsError, match="licensed llama3, not a license MOF counts as open"):
        _plan_base_model(FilePlan(), project, closed_rec)


@pytest.mark.slow
def test_two_rank_fsdp_run_from_a_hub_mistral(endpoint: HubServer, project: Path) -> None:
    import os

    from test_train import ENTRY
    from torchrun_jobs import finish_job, start_torchrun

    sha = upload_model(endpoint, tiny_model_folder(project.parent / "base", "mistral"), "tiny-m")
    short = {"num_steps": 2, "checkpoint_every": 2, "warmup_steps": 0}
    _write_params(project, {"pretrain": f"hf:{USER}/tiny-m@{sha}"}, pretrain=short)
    env = {**os.environ, "HF_ENDPOINT": endpoint.endpoint, "HF_HUB_DISABLE_XET": "1"}
    finish_job(start_torchrun(project, ENTRY, "pretrain", env=env), project)
    folder, meta = final_checkpoint(project, "pretrain")
    assert meta.base_model is not None and meta.base_model.commit == sha
    assert json.loads((folder / "config.json").read_text())["model_type"] == "mistral"
    # Rank 0 alone fetched: one download of the weights.
    downloads = [e for e in endpoint.requests("GET", "/resolve/") if e.lfs_bytes_out]
    assert [e.path.rsplit("/", 1)[-1] for e in downloads] == ["model.safetensors"]
