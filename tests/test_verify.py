from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_factory import (
    PROBE_TEXT,
    make_bundle,
    manifest_dict,
    write_checkpoint_meta,
    write_manifest,
)
from tokenizers import Tokenizer

from openrelease.errors import ArtifactError
from openrelease.manifest import CheckpointMeta, read_model
from openrelease.verify import bundle as verify
from openrelease.verify.bundle import VerifyReport, verify_bundle


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("pristine"), num_sft_checkpoints=1)


@pytest.fixture
def bundle(tmp_path: Path, pristine: Path) -> Path:
    dst = tmp_path / "release"
    shutil.copytree(pristine, dst)
    return dst


def _codes(report: VerifyReport) -> dict[str, set[str | None]]:
    out: dict[str, set[str | None]] = {}
    for p in report.problems:
        out.setdefault(p.code, set()).add(p.path)
    return out


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    snap = {}
    for p in sorted(root.rglob("*")):
        info = p.lstat()
        digest = (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
        )
        snap[str(p)] = (info.st_size, info.st_mtime_ns, digest)
    return snap


def _rewrite_meta(ckpt_dir: Path, **changes: object) -> None:
    meta = read_model(ckpt_dir / "meta.json", CheckpointMeta)
    (ckpt_dir / "meta.json").write_text(
        json.dumps(meta.model_copy(update=changes).model_dump(mode="json"))
    )


# --------------------------------------------------------------------------- clean bundle


def test_clean_bundle_verifies(bundle: Path) -> None:
    calls: list[tuple[int, int]] = []
    report = verify_bundle(bundle, progress=lambda done, total: calls.append((done, total)))
    assert report.ok, report.problems
    assert report.problems == []
    assert report.num_files == len(manifest_dict(bundle)["files"])  # type: ignore[arg-type]
    assert calls[-1] == (report.num_bytes, report.num_bytes)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    single = verify_bundle(bundle, num_threads=1)
    assert single.model_dump() == report.model_dump()
    assert json.loads(report.model_dump_json())["ok"] is True


def test_missing_folder_or_manifest_is_an_artifact_error(tmp_path: Path, bundle: Path) -> None:
    with pytest.raises(ArtifactError, match="not a folder"):
        verify_bundle(tmp_path / "nope")
    (bundle / "MANIFEST.json").unlink()
    with pytest.raises(ArtifactError, match=r"MANIFEST.json is missing"):
        verify_bundle(bundle)


# --------------------------------------------------------------------------- tamper corpus


@pytest.mark.parametrize(
    "rel",
    [
        "model/model.safetensors",
        "checkpoints/pretrain/step-10/model.safetensors",
        "model/config.json",
    ],
)
def test_flipped_byte_is_named(bundle: Path, rel: str) -> None:
    _flip_last_byte(bundle / rel)
    report = verify_bundle(bundle)
    assert not report.ok
    assert report.changed == [rel]
    assert rel in _codes(report)["changed_file"]


def test_flipped_checkpoint_weight_breaks_its_meta_too(bundle: Path) -> None:
    _flip_last_byte(bundle / "checkpoints/pretrain/step-10/model.safetensors")
    codes = _codes(verify_bundle(bundle))
    assert codes["checkpoint_files"] == {"checkpoints/pretrain/step-10/model.safetensors"}


def test_flipped_byte_in_manifest_digest(bundle: Path) -> None:
    data = manifest_dict(bundle)
    entry = next(e for e in data["files"] if e["path"] == "model/config.json")  # type: ignore[attr-defined]
    entry["sha256"] = entry["sha256"][:-1] + ("0" if entry["sha256"][-1] != "0" else "1")
    (bundle / "MANIFEST.json").write_text(json.dumps(data))
    report = verify_bundle(bundle)
    assert report.changed == ["model/config.json"]
    assert "MANIFEST.json" in _codes(report)["manifest_digest"]


def test_corrupt_manifest_is_an_artifact_error(bundle: Path) -> None:
    _flip_last_byte(bundle / "MANIFEST.json")  # trailing newline -> still JSON; break the brace
    text = (bundle / "MANIFEST.json").read_text()
    (bundle / "MANIFEST.json").write_text(text.replace("{", "[", 1))
    with pytest.raises(ArtifactError, match="not valid JSON"):
        verify_bundle(bundle)


def test_deleted_file_is_missing(bundle: Path) -> None:
    (bundle / "evals/results.json").unlink()
    report = verify_bundle(bundle)
    assert report.missing == ["evals/results.json"]
    assert not report.ok


def test_added_file_is_extra(bundle: Path) -> None:
    (bundle / "docs/notes.md").write_text("sneaky\n")
    report = verify_bundle(bundle)
    assert report.extra == ["docs/notes.md"]
    assert not report.ok


def test_swapped_checkpoints_are_named_even_with_a_fresh_manifest(bundle: Path) -> None:
    stage = bundle / "checkpoints/pretrain"
    (stage / "step-10").rename(stage / "tmp")
    (stage / "step-20").rename(stage / "step-10")
    (stage / "tmp").rename(stage / "step-20")
    assert set(verify_bundle(bundle).changed) >= {"checkpoints/pretrain/step-10/meta.json"}
    write_manifest(bundle)  # an attacker who re-lists the bundle is still caught
    codes = _codes(verify_bundle(bundle))
    assert codes["checkpoint_meta"] == {
        "checkpoints/pretrain/step-10",
        "checkpoints/pretrain/step-20",
    }
    assert "parent_chain" in codes


def test_broken_parent_chain_is_named(bundle: Path) -> None:
    _rewrite_meta(bundle / "checkpoints/pretrain/step-20", parent_digest="sha256:" + "0" * 64)
    write_manifest(bundle)
    report = verify_bundle(bundle)
    assert _codes(report) == {"parent_chain": {"checkpoints/pretrain/step-20"}}


def test_later_stage_must_start_from_an_earlier_stage(bundle: Path) -> None:
    _rewrite_meta(bundle / "checkpoints/sft/step-10", parent_digest=None)
    write_manifest(bundle)
    assert _codes(verify_bundle(bundle)) == {"parent_chain": {"checkpoints/sft/step-10"}}


def test_later_stage_may_start_from_an_outside_base(bundle: Path) -> None:
    _rewrite_meta(bundle / "checkpoints/sft/step-10", parent_digest="sha256:" + "e" * 64)
    write_manifest(bundle)
    report = verify_bundle(bundle)
    assert report.ok
    assert [(p.code, p.path, p.severity) for p in report.problems] == [
        ("outside_base", "checkpoints/sft/step-10", "warning")
    ]


def test_a_parent_missing_mid_stage_is_an_incomplete_chain(bundle: Path) -> None:
    _rewrite_meta(bundle / "checkpoints/pretrain/step-20", parent_digest="sha256:" + "e" * 64)
    sft = bundle / "checkpoints/sft/step-10"
    parent = read_model(bundle / "checkpoints/pretrain/step-20/meta.json", CheckpointMeta)
    _rewrite_meta(sft, parent_digest=parent.checkpoint_digest)
    write_manifest(bundle)
    report = verify_bundle(bundle)
    assert not report.ok
    assert any(p.code == "parent_chain" and "incomplete" in p.message for p in report.problems), (
        report.problems
    )


def test_later_stage_cannot_start_from_a_later_checkpoint(bundle: Path) -> None:
    sft = read_model(bundle / "checkpoints/sft/step-10/meta.json", CheckpointMeta)
    _rewrite_meta(bundle / "checkpoints/pretrain/step-10", parent_digest=sft.checkpoint_digest)
    write_manifest(bundle)
    # sft step-10 -> pretrain step-20 -> pretrain step-10 -> sft step-10: the lineage loops
    looped = verify_bundle(bundle)
    assert [(p.code, "loops" in p.message) for p in looped.problems] == [("parent_chain", True)]
    _rewrite_meta(bundle / "checkpoints/pretrain/step-10", parent_digest=None)
    grpo = bundle / "checkpoints/grpo/step-10"
    shutil.copytree(bundle / "checkpoints/sft/step-10", grpo)
    (grpo / "model.safetensors").write_bytes((grpo / "model.safetensors").read_bytes())
    _rewrite_meta(grpo, stage="grpo")
    _rewrite_meta(bundle / "checkpoints/sft/step-10", parent_digest=sft.checkpoint_digest)
    write_manifest(bundle)
    codes = _codes(verify_bundle(bundle))
    assert codes["parent_chain"] == {"checkpoints/sft/step-10"}


def test_forged_checkpoint_digest_is_named(bundle: Path) -> None:
    _rewrite_meta(bundle / "checkpoints/pretrain/step-10", checkpoint_digest="sha256:" + "1" * 64)
    write_manifest(bundle)
    codes = _codes(verify_bundle(bundle))
    assert codes["checkpoint_digest"] == {"checkpoints/pretrain/step-10"}
    assert codes["parent_chain"] == {"checkpoints/pretrain/step-20"}


def test_byte_identical_checkpoints_are_flagged(bundle: Path) -> None:
    ckpts = bundle / "checkpoints/pretrain"
    shutil.copy(ckpts / "step-10/model.safetensors", ckpts / "step-20/model.safetensors")
    parent = read_model(ckpts / "step-10/meta.json", CheckpointMeta).checkpoint_digest
    new = write_checkpoint_meta(ckpts / "step-20", stage="pretrain", step=20, parent_digest=parent)
    _rewrite_meta(bundle / "checkpoints/sft/step-10", parent_digest=new.checkpoint_digest)
    write_manifest(bundle)
    assert _codes(verify_bundle(bundle)) == {"duplicate_weights": {"checkpoints/pretrain/step-20"}}


def test_swapped_tokenizer_fails_the_probe(bundle: Path) -> None:
    tok = json.loads((bundle / "model/tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = Tokenizer.from_file(str(bundle / "model/tokenizer.json")).encode(PROBE_TEXT).tokens[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (bundle / "model/tokenizer.json").write_text(json.dumps(tok))
    write_manifest(bundle)
    report = verify_bundle(bundle)
    assert _codes(report) == {"tokenizer_probe": {"model/tokenizer.json"}}


def test_mof_paths_must_exist(bundle: Path) -> None:
    mof = (bundle / "mof.yaml").read_text()
    mof = mof.replace("component_path: code/train.py", "component_path: code/missing.py")
    mof = mof.replace("component_path: docs/report.md", "component_path: ../../etc/passwd")
    (bundle / "mof.yaml").write_text(mof)
    write_manifest(bundle)
    report = verify_bundle(bundle)
    messages = [p.message for p in report.problems if p.code == "mof_path"]
    assert len(messages) == 2
    assert any("code/missing.py" in m for m in messages)
    assert any("'..'" in m for m in messages)


def test_pickle_file_is_a_warning_and_never_loaded(bundle: Path) -> None:
    (bundle / "model/pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    write_manifest(bundle)
    report = verify_bundle(bundle)
    assert report.ok
    assert [(p.code, p.path, p.severity) for p in report.problems] == [
        ("pickle_file", "model/pytorch_model.bin", "warning")
    ]


# --------------------------------------------------------------------------- hostile bundles


def test_manifest_paths_escaping_the_bundle_are_not_read(bundle: Path) -> None:
    (bundle.parent / "secret.txt").write_text("secret")
    data = manifest_dict(bundle)
    files = data["files"]
    assert isinstance(files, list)
    for bad in ("../secret.txt", "/etc/hostname", "model/./config.json", "a\\b"):
        files.append({"path": bad, "size": 6, "sha256": "sha256:" + "0" * 64})
    (bundle / "MANIFEST.json").write_text(json.dumps(data))
    report = verify_bundle(bundle)
    unsafe = _codes(report)["unsafe_path"]
    assert unsafe == {"../secret.txt", "/etc/hostname", "model/./config.json", "a\\b"}
    assert report.missing == []


def test_symlinks_are_reported_not_followed(bundle: Path) -> None:
    outside = bundle.parent / "outside"
    outside.mkdir()
    (outside / "big.safetensors").write_bytes(b"\xff" * 64)
    (bundle / "model/evil.safetensors").symlink_to(outside / "big.safetensors")
    (bundle / "data/linked").symlink_to(outside, target_is_directory=True)
    (bundle / "docs/alias.md").symlink_to(bundle / "docs/report.md")
    (bundle / "docs/loop").symlink_to(bundle / "docs/loop")
    report = verify_bundle(bundle)
    symlinks = {p.path: p.message for p in report.problems if p.code == "symlink"}
    assert set(symlinks) == {"model/evil.safetensors", "data/linked", "docs/alias.md", "docs/loop"}
    assert "OUTSIDE" in symlinks["data/linked"]
    assert "inside" in symlinks["docs/alias.md"]
    assert "safetensors_header" not in _codes(report)


def test_lying_safetensors_header_in_bundle(bundle: Path) -> None:
    path = bundle / "checkpoints/pretrain/step-20/model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = (len(data) * 4).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    report = verify_bundle(bundle)
    assert "checkpoints/pretrain/step-20/model.safetensors" in _codes(report)["safetensors_header"]


def test_oversized_manifest_is_refused(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(ArtifactError, match="above the 1000-byte limit"):
        verify_bundle(bundle)


def test_invalid_utf8_manifest_is_refused(bundle: Path) -> None:
    (bundle / "MANIFEST.json").write_bytes(b'{"name": "\xff"}')
    with pytest.raises(ArtifactError, match="not valid UTF-8"):
        verify_bundle(bundle)


def test_deeply_nested_json_and_yaml_become_problems(bundle: Path) -> None:
    (bundle / "checkpoints/pretrain/step-20/meta.json").write_text("[" * 200_000 + "]" * 200_000)
    (bundle / "mof.yaml").write_text("a: " + "[" * 50_000 + "]" * 50_000 + "\n")
    write_manifest(bundle)
    codes = _codes(verify_bundle(bundle))
    assert "checkpoints/pretrain/step-20/meta.json" in codes["checkpoint_meta"]
    assert codes["mof"] == {"mof.yaml"}


def test_yaml_alias_bomb_is_cheap(bundle: Path) -> None:
    lines = ['a0: &a0 ["x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 12)]
    (bundle / "mof.yaml").write_text("\n".join(lines) + "\n")
    write_manifest(bundle)
    assert verify_bundle(bundle).ok


def test_invalid_utf8_files_and_names(bundle: Path) -> None:
    (bundle / "model/tokenizer_probe.json").write_bytes(b'{"text": "\xff\xfe"}')
    os.close(os.open(os.fsencode(bundle / "docs") + b"/bad\xffname.md", os.O_CREAT | os.O_WRONLY))
    report = verify_bundle(bundle)
    codes = _codes(report)
    assert "model/tokenizer_probe.json" in codes["tokenizer"]
    assert codes["bad_filename"] == {"docs/bad\ufffdname.md"}
    report.model_dump_json()  # the report itself is valid UTF-8 JSON


def test_fifo_does_not_hang(bundle: Path) -> None:
    os.mkfifo(bundle / "data/pipe")
    assert _codes(verify_bundle(bundle))["not_regular"] == {"data/pipe"}


def test_verify_and_hub_modules_never_import_torch() -> None:
    code = (
        "import sys, openrelease.verify.bundle, openrelease.verify.hub,"
        " openrelease.verify.safetensors_header;"
        "print(sorted({'torch', 'mlflow'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_verify_never_writes(tmp_path: Path, bundle: Path) -> None:
    (tmp_path / "secret.txt").write_text("secret")
    (bundle / "model/evil.json").symlink_to(tmp_path / "secret.txt")
    (bundle / "model/pytorch_model.bin").write_bytes(b"\x80\x04")
    _flip_last_byte(bundle / "model/model.safetensors")
    before = _snapshot(tmp_path)
    report = verify_bundle(bundle)
    assert not report.ok
    assert _snapshot(tmp_path) == before
