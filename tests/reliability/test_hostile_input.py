"""Hostile input through the real CLI: every case fails cleanly, writes nothing, leaves nothing.

Each case drives `openrelease` as a user would (Typer's CliRunner; a real process where the
process matters) and checks the documented exit code (1: an error or a failed check, 2: a
usage error), one ``error:`` line (or the report line naming the problem), no traceback, and
that nothing changed under the test's tmp folder except where the command is meant to write.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bundle_factory import manifest_dict, write_manifest
from cli_checks import (
    assert_clean_error,
    assert_no_crash,
    changed_files,
    copy_bundle,
    hostile_pickle,
    invoke,
    snapshot,
)
from hubserver import TOKEN, USER, HubServer
from huggingface_hub import HfApi

from openrelease.digest import sha256_tree
from openrelease.release.publish import publish_bundle

pytestmark = pytest.mark.usefixtures("cwd_in_tmp")

PARAMS = (Path(__file__).parents[1] / "assets" / "params_test.yaml").read_text(encoding="utf-8")
SENTINEL = "pwned"
"""A file that hostile input tries to create by running code; it must never appear."""


def _params(old: str, new: str) -> bytes:
    assert old in PARAMS, old
    return PARAMS.replace(old, new, 1).encode()


def _alias_bomb() -> bytes:
    """The "billion laughs": ten levels of nine aliases expand to 9**10 scalars."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return ("\n".join(lines) + "\n").encode()


# --------------------------------------------------------------------------- params.yaml

ParamsMaker = Callable[[Path], bytes]

PARAMS_CASES = [
    pytest.param(
        lambda _: _alias_bomb(), r"YAML aliases \(\*a0\) are not allowed", id="yaml-alias-bomb"
    ),
    pytest.param(
        lambda _: (PARAMS + "seed: 5\n").encode(),
        r":\d+: invalid YAML \(duplicate key 'seed'\)",
        id="duplicate-key",
    ),
    pytest.param(
        lambda tmp: f"seed: !!python/object/apply:os.system ['touch {tmp / SENTINEL}']\n".encode(),
        r":1: invalid YAML \(could not determine a constructor for the tag .*python/object",
        id="python-tag",
    ),
    pytest.param(
        lambda _: _params("seed: 1234", "seed: twelve"),
        r"seed: Input should be a valid integer.*\(got 'twelve'\)",
        id="wrong-type-scalar",
    ),
    pytest.param(
        lambda _: _params("  lr: 3.0e-3", "  lr: {peak: 3.0e-3}"),
        r"pretrain\.lr: Input should be a valid number",
        id="wrong-type-mapping",
    ),
    pytest.param(
        lambda _: _params("  lr: 3.0e-3", "  learning_rate: 3.0e-3"),
        r"pretrain\.learning_rate: unknown key \(did you mean 'lr'\?\)",
        id="unknown-key",
    ),
    pytest.param(
        lambda _: PARAMS.encode() + b"# caf\xe9 in latin-1\n",
        r"not UTF-8 \(byte \d+\); save it as UTF-8",
        id="invalid-utf8",
    ),
    pytest.param(
        lambda _: PARAMS.encode() + b"#" * (2 << 20) + b"\n",
        r"is \d+ bytes, above the 1048576-byte limit",
        id="huge-file",
    ),
    pytest.param(
        lambda _: b"seed: " + b"[" * 20_000 + b"]" * 20_000 + b"\n",
        r"YAML nested too deeply to read",
        id="deeply-nested",
    ),
    pytest.param(
        lambda _: b"- seed\n- data\n", r"expected a mapping of sections", id="not-a-mapping"
    ),
    pytest.param(
        lambda _: _params("seed: 1234", "seed: 1" + "0" * 5000),
        r"invalid YAML value \(Exceeds the limit",
        id="5000-digit-integer",
    ),
    pytest.param(
        lambda _: PARAMS.encode() + b"\x00\n",
        r"invalid YAML \(unacceptable character #x0000",
        id="nul-byte",
    ),
]


@pytest.mark.parametrize(("make", "match"), PARAMS_CASES)
def test_hostile_params_yaml(tmp_path: Path, make: ParamsMaker, match: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(make(tmp_path))
    before = snapshot(tmp_path)
    line = assert_clean_error(invoke("params", "show", "--params", str(path)), match=match)
    assert line.startswith(f"error: {path}")
    assert changed_files(before, snapshot(tmp_path)) == []
    assert not (tmp_path / SENTINEL).exists()


def test_params_path_is_a_folder(tmp_path: Path) -> None:
    result = invoke("params", "show", "--params", str(tmp_path))
    assert_clean_error(result, match=r"is a folder; pass the params YAML file")


def test_python_tag_runs_nothing_in_a_real_process(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(f"seed: !!python/object/apply:os.system ['touch {tmp_path / SENTINEL}']\n")
    cmd = [sys.executable, "-m", "openrelease", "params", "show", "--params", str(path)]
    env = {**os.environ, "OPENRELEASE_DEBUG": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {path}:1: invalid YAML")
    assert not (tmp_path / SENTINEL).exists()


# --------------------------------------------------------------------------- data stage

Setup = Callable[[Path, Path], dict[str, str]]
"""(project, outside) -> the import spec; writes whatever the case needs."""


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _jsonl(data: bytes, role: str = "sft") -> Setup:
    def setup(project: Path, outside: Path) -> dict[str, str]:
        _write(project / "corpus" / "d.jsonl", data)
        return {"format": "jsonl", "path": "corpus/d.jsonl", "role": role}

    return setup


def _truncated_parquet(project: Path, outside: Path) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = project / "corpus" / "d.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["a story about a fox"] * 200}), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return {"format": "parquet", "path": "corpus/d.parquet", "role": "pretrain"}


def _traversal(project: Path, outside: Path) -> dict[str, str]:
    _write(outside / "s.jsonl", b'{"prompt": "p", "response": "r"}\n')
    return {"format": "jsonl", "path": "../outside/s.jsonl", "role": "sft"}


def _absolute(project: Path, outside: Path) -> dict[str, str]:
    _write(outside / "s.txt", b"a private document\n")
    return {"format": "text", "path": str(outside / "s.txt"), "role": "pretrain"}


def _symlink_escape(project: Path, outside: Path) -> dict[str, str]:
    _write(outside / "s.jsonl", b'{"prompt": "p", "response": "r"}\n')
    (project / "corpus").mkdir()
    (project / "corpus" / "d.jsonl").symlink_to(outside / "s.jsonl")
    return {"format": "jsonl", "path": "corpus/d.jsonl", "role": "sft"}


def _hf_folder_escape(project: Path, outside: Path) -> dict[str, str]:
    _write(outside / "data.arrow", b"not arrow")
    state = {"_data_files": [{"filename": "../../outside/data.arrow"}]}
    _write(project / "corpus" / "ds" / "state.json", json.dumps(state).encode())
    return {"format": "hf_datasets", "path": "corpus/ds", "role": "grpo"}


def _fifo(project: Path, outside: Path) -> dict[str, str]:
    (project / "corpus").mkdir()
    os.mkfifo(project / "corpus" / "d.jsonl")  # opening it for reading would block forever
    return {"format": "jsonl", "path": "corpus/d.jsonl", "role": "sft"}


IMPORT_CASES = [
    pytest.param(
        _jsonl(b'{"prompt": "2+2?"}\n'),
        r"corpus/d\.jsonl:1: missing field 'response' needed by role sft",
        id="jsonl-missing-field",
    ),
    pytest.param(
        _jsonl(b'{"prompt": "ok", "response": "ok"}\n{"prompt": "\xff", "response": "r"}\n'),
        r"corpus/d\.jsonl:2: not valid UTF-8",
        id="jsonl-invalid-utf8",
    ),
    pytest.param(
        _jsonl(b"[" * 100_000 + b"]" * 100_000 + b"\n"),
        r"corpus/d\.jsonl:1: invalid JSON \(nested too deeply\)",
        id="jsonl-deeply-nested",
    ),
    pytest.param(
        _jsonl(b'{"prompt": "p", "response": ["r"]}\n'),
        r"corpus/d\.jsonl:1: field 'response' must be a string, got list",
        id="jsonl-wrong-type",
    ),
    pytest.param(
        _truncated_parquet,
        r"corpus/d\.parquet: not a readable Parquet file",
        id="parquet-truncated",
    ),
    pytest.param(
        _traversal,
        r"data\.imports\.0\.path: must stay inside the project \(no '\.\.'\)",
        id="import-path-traversal",
    ),
    pytest.param(
        _absolute,
        r"data\.imports\.0\.path: must be relative to the project root, not absolute",
        id="import-absolute-path",
    ),
    pytest.param(
        _symlink_escape,
        r"corpus/d\.jsonl: resolves outside the project",
        id="import-symlink-escapes-project",
    ),
    pytest.param(
        _hf_folder_escape,
        r"corpus/ds/state\.json: data file '\.\./\.\./outside/data\.arrow' is outside the folder",
        id="hf-datasets-file-escapes-folder",
    ),
    pytest.param(_fifo, r"corpus/d\.jsonl: expected a file for format jsonl", id="import-fifo"),
]


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(project, outside): an empty project folder (the cwd) and a folder beside it."""
    project, outside = tmp_path / "project", tmp_path / "outside"
    project.mkdir()
    outside.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return project, outside


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("setup", "match"), IMPORT_CASES)
def test_hostile_data_import(workspace: tuple[Path, Path], setup: Setup, match: str) -> None:
    project, outside = workspace
    spec = setup(project, outside)
    imports = "[{" + ", ".join(f"{k}: '{v}'" for k, v in spec.items()) + "}]"
    (project / "params.yaml").write_bytes(_params("imports: []", f"imports: {imports}"))
    before = snapshot(project.parent)
    assert_clean_error(invoke("data"), match=match)
    assert changed_files(before, snapshot(project.parent)) == []  # no data, no MLflow record
    assert not (project / "artifacts" / "data").exists()


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        pytest.param(
            "out_dir: artifacts/data",
            "out_dir: ../escaped",
            r"data\.out_dir: must stay inside the project \(no '\.\.'\)",
            id="out-dir-traversal",
        ),
        pytest.param(
            "out_dir: artifacts/data",
            "out_dir: {outside}/escaped",
            r"data\.out_dir: must be relative to the project root, not absolute",
            id="out-dir-absolute",
        ),
    ],
)
def test_data_stage_never_writes_outside_the_project(
    workspace: tuple[Path, Path], old: str, new: str, match: str
) -> None:
    project, outside = workspace
    (project / "params.yaml").write_bytes(_params(old, new.format(outside=outside)))
    before = snapshot(project.parent)
    assert_clean_error(invoke("data"), match=match)
    assert changed_files(before, snapshot(project.parent)) == []
    assert not (project.parent / "escaped").exists() and not (outside / "escaped").exists()


# --------------------------------------------------------------------------- bundles

Mutate = Callable[[Path, Path], None]
"""(bundle, outside) -> None: make the bundle hostile."""


def _edit_manifest(bundle: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit MANIFEST.json and re-seal it (a consistent bundle_digest), as an attacker would."""
    manifest = manifest_dict(bundle)
    edit(manifest)
    files = manifest["files"]
    assert isinstance(files, list)
    manifest["bundle_digest"] = sha256_tree({f["path"]: f["sha256"] for f in files})
    (bundle / "MANIFEST.json").write_text(json.dumps(manifest))


def _add_entry(path: str) -> Mutate:
    def mutate(bundle: Path, outside: Path) -> None:
        entry = {"path": path.format(outside=outside), "size": 7, "sha256": "sha256:" + "0" * 64}
        _edit_manifest(bundle, lambda m: m["files"].append(entry))

    return mutate


def _safetensors(header: dict[str, Any], data: bytes, *, claimed_len: int | None = None) -> Mutate:
    def mutate(bundle: Path, outside: Path) -> None:
        raw = json.dumps(header).encode()
        length = len(raw) if claimed_len is None else claimed_len
        (bundle / "model" / "model.safetensors").write_bytes(struct.pack("<Q", length) + raw + data)
        write_manifest(bundle)

    return mutate


def _symlink_weights_to_fifo(bundle: Path, outside: Path) -> None:
    os.mkfifo(outside / "fifo")  # if anything opened it for reading, the test would hang
    weights = bundle / "model" / "model.safetensors"
    weights.unlink()
    weights.symlink_to(outside / "fifo")


def _symlink_folder(bundle: Path, outside: Path) -> None:
    (outside / "private.md").write_text("private notes\n")
    (bundle / "docs" / "more").symlink_to(outside, target_is_directory=True)


def _pickle_weights(bundle: Path, outside: Path) -> None:
    payload = hostile_pickle(outside / SENTINEL)
    (bundle / "model" / "pytorch_model.bin").write_bytes(payload)
    write_manifest(bundle)


def _truncate(rel: str) -> Mutate:
    def mutate(bundle: Path, outside: Path) -> None:
        path = bundle / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return mutate


def _meta(text: str) -> Mutate:
    def mutate(bundle: Path, outside: Path) -> None:
        (bundle / "checkpoints" / "pretrain" / "step-10" / "meta.json").write_text(text)
        write_manifest(bundle)

    return mutate


def _meta_wrong_types(bundle: Path, outside: Path) -> None:
    path = bundle / "checkpoints" / "pretrain" / "step-10" / "meta.json"
    meta = json.loads(path.read_text())
    meta["step"], meta["files"] = "ten", {"model.safetensors": 1}
    path.write_text(json.dumps(meta))
    write_manifest(bundle)


def _fifo_in_bundle(bundle: Path, outside: Path) -> None:
    os.mkfifo(bundle / "docs" / "notes.md")


def _bad_filename(bundle: Path, outside: Path) -> None:
    (bundle / "docs" / os.fsdecode(b"r\xe9sum\xe9.md")).write_text("latin-1 name\n")


def _duplicate_entry(bundle: Path, outside: Path) -> None:
    _edit_manifest(bundle, lambda m: m["files"].append(m["files"][0]))


def _tokenizer_garbage(bundle: Path, outside: Path) -> None:
    (bundle / "model" / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    write_manifest(bundle)


def _mof_text(old: str, new: str) -> Mutate:
    def mutate(bundle: Path, outside: Path) -> None:
        path = bundle / "mof.yaml"
        text = path.read_text()
        assert old in text, old
        path.write_text(text.replace(old, new, 1))
        write_manifest(bundle)

    return mutate


def _readme(text: str) -> Mutate:
    def mutate(bundle: Path, outside: Path) -> None:
        (bundle / "README.md").write_text(text)
        write_manifest(bundle)

    return mutate


WEIGHTS = "model/model.safetensors"
F32_PAIR = {"dtype": "F32", "shape": [2]}
BUNDLE_CASES = [
    # (mutate, verify exit code, verify problem code, its path, audit problem code)
    pytest.param(
        _add_entry("../outside/secret.txt"),
        1,
        "unsafe_path",
        "../outside/secret.txt",
        "unsafe_path",
        id="manifest-path-dotdot",
    ),
    pytest.param(
        _add_entry("{outside}/secret.txt"),
        1,
        "unsafe_path",
        None,
        "unsafe_path",
        id="manifest-path-absolute",
    ),
    pytest.param(
        _symlink_weights_to_fifo, 1, "symlink", WEIGHTS, "symlink", id="symlink-escapes-bundle"
    ),
    pytest.param(_symlink_folder, 1, "symlink", "docs/more", "symlink", id="symlinked-folder"),
    pytest.param(
        _pickle_weights,
        0,
        "pickle_file",
        "model/pytorch_model.bin",
        None,
        id="pickle-bin-weights-flagged-never-loaded",
    ),
    pytest.param(
        _safetensors(
            {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, b"\0" * 16
        ),
        1,
        "safetensors_header",
        WEIGHTS,
        "evidence",
        id="safetensors-claims-more-bytes-than-file",
    ),
    pytest.param(
        _safetensors({}, b"", claimed_len=8 << 30),
        1,
        "safetensors_header",
        WEIGHTS,
        "evidence",
        id="safetensors-8GiB-header-length",
    ),
    pytest.param(
        _safetensors(
            {"a": {**F32_PAIR, "data_offsets": [0, 8]}, "b": {**F32_PAIR, "data_offsets": [4, 12]}},
            b"\0" * 12,
        ),
        1,
        "safetensors_header",
        WEIGHTS,
        "evidence",
        id="safetensors-overlapping-offsets",
    ),
    pytest.param(
        _truncate(WEIGHTS), 1, "changed_file", WEIGHTS, "manifest_mismatch", id="truncated-weights"
    ),
    pytest.param(
        _meta_wrong_types,
        1,
        "checkpoint_meta",
        "checkpoints/pretrain/step-10/meta.json",
        "evidence",
        id="meta-json-wrong-types",
    ),
    pytest.param(
        _meta('{"a":' * 100_000 + "1" + "}" * 100_000),
        1,
        "checkpoint_meta",
        "checkpoints/pretrain/step-10/meta.json",
        "evidence",
        id="meta-json-deeply-nested",
    ),
    pytest.param(_fifo_in_bundle, 1, "not_regular", "docs/notes.md", "symlink", id="fifo"),
    pytest.param(
        _bad_filename, 1, "bad_filename", "docs/r\ufffdsum\ufffd.md", None, id="non-utf8-file-name"
    ),
    pytest.param(
        _duplicate_entry, 1, "manifest_duplicate", None, None, id="manifest-duplicate-entry"
    ),
    pytest.param(
        _tokenizer_garbage, 1, "tokenizer", "model/tokenizer.json", None, id="tokenizer-garbage"
    ),
    pytest.param(
        _mof_text("component_path: code/train.py", "component_path: ../../outside/secret.txt"),
        1,
        "mof_path",
        "mof.yaml",
        "evidence",
        id="mof-component-path-traversal",
    ),
    pytest.param(
        _mof_text("component_path: docs/report.md", "component_path: /etc/passwd"),
        1,
        "mof_path",
        "mof.yaml",
        "evidence",
        id="mof-component-path-absolute",
    ),
    pytest.param(
        _readme("---\nlicense: " + "[" * 20_000 + "]" * 20_000 + "\n---\n# card\n"),
        0,
        None,
        None,
        "evidence",
        id="readme-front-matter-deeply-nested",
    ),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("mutate", "verify_exit", "verify_code", "verify_path", "audit_code"), BUNDLE_CASES
)
def test_hostile_bundle(
    tmp_path: Path,
    pristine_bundle: Path,
    mutate: Mutate,
    verify_exit: int,
    verify_code: str | None,
    verify_path: str | None,
    audit_code: str | None,
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    bundle = copy_bundle(pristine_bundle, tmp_path)
    mutate(bundle, outside)
    before = snapshot(tmp_path)

    result = invoke("verify", str(bundle), "--json")
    assert result.exit_code == verify_exit, result.output
    assert_no_crash(result)
    problems = {(p["code"], p["path"]) for p in json.loads(result.stdout)["problems"]}
    if verify_code is not None:
        assert verify_code in {code for code, _ in problems}, problems
    if verify_path is not None:
        assert (verify_code, verify_path) in problems, problems
    human = invoke("verify", str(bundle))
    assert human.exit_code == verify_exit and human.stderr == ""
    if verify_code is not None:  # one line per problem, naming its code and path
        assert any(f"[{verify_code}]" in line for line in human.stdout.splitlines())

    audit = invoke("audit", str(bundle), "--json")
    assert audit.exit_code == 0, audit.output  # a report; --require-class turns it into a gate
    assert_no_crash(audit)
    codes = {p["code"] for p in json.loads(audit.stdout)["problems"] if p["severity"] == "error"}
    if audit_code is not None:
        assert audit_code in codes, codes

    assert changed_files(before, snapshot(tmp_path)) == []  # read-only, nothing left behind
    assert not (outside / SENTINEL).exists()  # the pickle was never loaded


MANIFEST_CASES = [
    pytest.param(
        lambda m: m.open("r+b").truncate(65 << 20),  # sparse: costs no disk
        r"MANIFEST\.json is \d+ bytes, above the 67108864-byte limit",
        id="manifest-huge",
    ),
    pytest.param(
        lambda m: m.write_text("[" * 200_000 + "]" * 200_000),
        r"MANIFEST\.json is JSON nested too deeply to read",
        id="manifest-deeply-nested",
    ),
    pytest.param(
        lambda m: m.write_text(m.read_text().replace('"size": ', '"size": "big", "x": ', 1)),
        r"MANIFEST\.json does not match the BundleManifest schema at files\.0\.size",
        id="manifest-wrong-types",
    ),
    pytest.param(
        lambda m: m.write_text(json.dumps({**json.loads(m.read_text()), "files": "all"})),
        r"MANIFEST\.json does not match the BundleManifest schema at files",
        id="manifest-files-not-a-list",
    ),
    pytest.param(
        lambda m: m.write_bytes(m.read_bytes()[: m.stat().st_size // 2]),
        r"MANIFEST\.json is not valid JSON",
        id="manifest-truncated",
    ),
    pytest.param(
        lambda m: m.write_bytes(b'{"name": "caf\xe9"}'),
        r"MANIFEST\.json is not valid UTF-8",
        id="manifest-invalid-utf8",
    ),
    pytest.param(
        lambda m: (m.rename(m.parent.parent / "M.json"), m.symlink_to(m.parent.parent / "M.json")),
        r"MANIFEST\.json cannot be opened",
        id="manifest-is-a-symlink",
    ),
]


@pytest.mark.parametrize(("mutate", "match"), MANIFEST_CASES)
def test_hostile_manifest(
    tmp_path: Path, pristine_bundle: Path, mutate: Callable[[Path], object], match: str
) -> None:
    bundle = copy_bundle(pristine_bundle, tmp_path)
    mutate(bundle / "MANIFEST.json")
    before = snapshot(tmp_path)
    assert_clean_error(invoke("verify", str(bundle)), match=match)
    audit = invoke("audit", str(bundle), "--json")
    assert audit.exit_code == 0 and not json.loads(audit.stdout)["ok"]
    assert_no_crash(audit)
    assert changed_files(before, snapshot(tmp_path)) == []


MOF_CASES = [
    pytest.param(
        _mof_text("name: Training code", "name: Secret sauce"),
        r"release\.components\.3\.name: unknown component 'Secret sauce'",
        id="mof-unknown-component",
    ),
    pytest.param(
        _mof_text("  - name: Model architecture", "  - name: [Model, architecture]"),
        r"release\.components\.0\.name: Input should be a valid string",
        id="mof-wrong-types",
    ),
    pytest.param(
        _mof_text("framework:", "# " + "x" * (2 << 20) + "\nframework:"),
        r"mof\.yaml is \d+ bytes, above the 1048576-byte limit",
        id="mof-huge",
    ),
    pytest.param(
        _mof_text("framework:", _alias_bomb().decode() + "framework:"),
        r"YAML aliases \(\*a0\) are not allowed",
        id="mof-alias-bomb",
    ),
    pytest.param(
        _mof_text("date: '2025-01-01'", "date: 2025-13-45"),
        r"invalid YAML value \(month must be in 1\.\.12\)",
        id="mof-impossible-date",
    ),
    pytest.param(
        _mof_text("framework:", "x: " + "[" * 20_000 + "]" * 20_000 + "\nframework:"),
        r"YAML nested too deeply to read",
        id="mof-deeply-nested",
    ),
    pytest.param(
        _mof_text("  version: 1M", "  version: 1M\n  version: 7B"),
        r"invalid YAML \(duplicate key 'version'\)",
        id="mof-duplicate-key",
    ),
]


@pytest.mark.parametrize(("mutate", "match"), MOF_CASES)
def test_hostile_mof_yaml(
    tmp_path: Path, pristine_bundle: Path, mutate: Mutate, match: str
) -> None:
    bundle = copy_bundle(pristine_bundle, tmp_path)
    mutate(bundle, tmp_path)
    before = snapshot(tmp_path)
    assert_clean_error(invoke("audit", str(bundle / "mof.yaml")), match=match)
    audit = invoke("audit", str(bundle), "--json")  # inside a release: reported, not fatal
    assert audit.exit_code == 0, audit.output
    assert_no_crash(audit)
    assert "mof_yaml" in {p["code"] for p in json.loads(audit.stdout)["problems"]}
    assert_no_crash(invoke("verify", str(bundle)))
    assert changed_files(before, snapshot(tmp_path)) == []


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["verify", "{bundle}", "--num-threads", "0"], id="verify-zero-threads"),
        pytest.param(["audit", "{bundle}", "--require-class", "IV"], id="audit-unknown-class"),
        pytest.param(["publish", "{bundle}"], id="publish-without-repo-id"),
        pytest.param(["params", "show", "--params"], id="option-without-value"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, pristine_bundle: Path, args: list[str]) -> None:
    bundle = copy_bundle(pristine_bundle, tmp_path)
    before = snapshot(tmp_path)
    result = invoke(*(a.format(bundle=bundle) for a in args))
    assert result.exit_code == 2, result.output
    assert_no_crash(result)
    assert "Error" in result.stderr and result.stdout == ""
    assert changed_files(before, snapshot(tmp_path)) == []


# --------------------------------------------------------------------------- Hub answers

HUB_FAULTS = [
    pytest.param(401, {}, r"HTTP 401: .*; the token is missing or invalid", id="401"),
    pytest.param(404, {}, r"HTTP 404: .*does not exist or is not visible", id="404"),
    pytest.param(
        429,
        {"Retry-After": "7"},
        r"HTTP 429: .*; the Hub is rate-limiting; retry after 7 s",
        id="429-retry-after",
    ),
    pytest.param(500, {}, r"HTTP 500: .*; the Hub failed; retry later", id="500"),
    pytest.param(503, {}, r"HTTP 503: .*; the Hub failed; retry later", id="503"),
    pytest.param(0, {}, r"no answer: .*reset.*; check --endpoint", id="connection-reset"),
]
REPO = f"{USER}/tiny-open-llm"


@pytest.fixture
def published(hub: HubServer, pristine_bundle: Path) -> str:
    """The pristine bundle published on the loopback Hub; returns its repo id."""
    report = publish_bundle(pristine_bundle, repo_id=REPO, endpoint=hub.endpoint, token=TOKEN)
    assert report.ok
    return REPO


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder `tempfile` uses during the test, to prove downloads are cleaned up."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.mark.parametrize(
    ("command", "pattern"),
    [
        pytest.param("verify", r"/api/models/{repo}/refs$", id="verify-listing"),
        pytest.param("audit", r"/api/models/{repo}$", id="audit-listing"),
    ],
)
@pytest.mark.parametrize(("status", "headers", "match"), HUB_FAULTS)
def test_hub_fault_when_reading(
    hub: HubServer,
    published: str,
    private_tmp: Path,
    command: str,
    pattern: str,
    status: int,
    headers: dict[str, str],
    match: str,
) -> None:
    hub.inject("GET", pattern.format(repo=published), status, times=-1, headers=headers)
    target = f"hf:{published}" if command == "verify" else published
    seen = len(hub.log)
    assert_clean_error(invoke(command, target, "--endpoint", hub.endpoint), match=match)
    assert list(private_tmp.iterdir()) == []
    assert not any(e.mutating for e in hub.log[seen:])


@pytest.mark.parametrize(
    ("status", "match"),
    [
        pytest.param(404, r"HTTP 404: .*does not exist", id="404"),
        pytest.param(0, r"no answer: .*reset", id="connection-reset"),
    ],
)
@pytest.mark.parametrize("command", ["verify", "audit"])
def test_hub_fault_when_downloading(
    hub: HubServer, published: str, private_tmp: Path, command: str, status: int, match: str
) -> None:
    hub.inject("*", f"/{published}/resolve/", status, times=-1)
    target = f"hf:{published}" if command == "verify" else published
    assert_clean_error(invoke(command, target, "--endpoint", hub.endpoint), match=match)
    assert list(private_tmp.iterdir()) == []


def _lfs_bytes(bundle: Path) -> int:
    """Bytes of the distinct LFS objects (safetensors) the bundle holds."""
    weights = {p.read_bytes() for p in bundle.rglob("*.safetensors")}
    return sum(len(w) for w in weights)


@pytest.mark.parametrize(("status", "headers", "match"), HUB_FAULTS)
def test_hub_fault_when_publishing_then_resume(
    hub: HubServer,
    pristine_bundle: Path,
    tmp_path: Path,
    status: int,
    headers: dict[str, str],
    match: str,
) -> None:
    bundle = copy_bundle(pristine_bundle, tmp_path)
    env = {"HF_TOKEN": TOKEN}
    args = ["publish", str(bundle), "--repo-id", REPO, "--endpoint", hub.endpoint, "--yes"]
    hub.inject("GET", r"/refs$", status, times=1, headers=headers)
    assert_clean_error(invoke(*args, env=env), match=match)
    assert hub.repos == {} and not any(e.mutating for e in hub.log)  # stopped before any change

    hub.inject("POST", r"/commit/", status, times=-1, headers=headers)
    line = assert_clean_error(invoke(*args, env=env), match=match)
    assert TOKEN not in line
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    for branch in api.list_repo_refs(REPO).branches:  # no release file landed anywhere
        assert api.list_repo_files(REPO, revision=branch.name) == [".gitattributes"]

    hub.faults.clear()
    result = invoke(*args, "--json", env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] is True
    assert hub.lfs_bytes_uploaded == _lfs_bytes(bundle)  # resumed: nothing sent twice
    assert invoke("verify", f"hf:{REPO}", "--endpoint", hub.endpoint).exit_code == 0


def test_hub_429_in_a_real_process(hub: HubServer, pristine_bundle: Path) -> None:
    hub.inject("POST", r"/commit/", 429, times=-1, headers={"Retry-After": "30"})
    cmd = [sys.executable, "-m", "openrelease", "publish", str(pristine_bundle)]
    cmd += ["--repo-id", REPO, "--endpoint", hub.endpoint, "--yes"]
    env = {**os.environ, "HF_TOKEN": TOKEN, "OPENRELEASE_DEBUG": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == proc.stderr.strip().splitlines()[-1]
    assert "HTTP 429" in errors[0] and "retry after 30 s" in errors[0]
