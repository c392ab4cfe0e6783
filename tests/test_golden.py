"""Golden digests: the tiny recipe gives the recorded bytes on whichever machine runs the tests.

tests/golden/tiny.json was made in portable mode (tests/golden/regenerate.py); on any x86-64 CPU
with AVX2, replaying pretrain to its first checkpoint must give the same sha256. `make test` runs
the replay on every CPU vendor listed in tiny.json's ``confirmed_on`` and skips it, saying so,
on a vendor that has not confirmed the digests yet; `make golden` (OPENRELEASE_GOLDEN=1) runs
it on any machine (README "Golden digests").
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from project_paths import REPO_ROOT

from openrelease.layout import CHECKPOINT_META, WEIGHTS, Workspace
from openrelease.manifest import CheckpointMeta, read_model
from openrelease.params import load_params
from openrelease.record.fingerprint import cpu_fingerprint

GOLDEN = REPO_ROOT / "tests" / "golden" / "tiny.json"
RECIPE = REPO_ROOT / "pipelines" / "tiny.yaml"
REGENERATE = ".venv/bin/python tests/golden/regenerate.py"


def _golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(GOLDEN.read_text())
    return data


def _confirmed_vendors() -> set[str]:
    entries = _golden().get("confirmed_on", [])
    assert isinstance(entries, list)
    return {str(e["vendor"]) for e in entries}


def test_golden_file_says_which_cpus_confirmed_it() -> None:
    entries = _golden().get("confirmed_on")
    assert isinstance(entries, list) and entries, f"no confirmed_on in tiny.json; run {REGENERATE}"
    for entry in entries:
        assert {"vendor", "model", "family", "isa", "date"} <= set(entry)
    readme = (REPO_ROOT / "README.md").read_text()
    confirmed = readme.split("Confirmed on (")[1].split("\n\n**")[0]
    for entry in entries:  # every confirmation is in the README's list, by model and date
        assert entry["model"] in confirmed and entry["date"] in confirmed, entry


def test_golden_file_covers_every_checkpoint_of_the_recipe() -> None:
    golden, params = _golden(), load_params(RECIPE)
    assert params.compute.determinism == "portable"
    expected = set()
    for stage in params.train_stages:
        section = params.stage(stage)
        steps = range(section.checkpoint_every, section.num_steps + 1, section.checkpoint_every)
        expected |= {f"{stage}/step-{s}" for s in {*steps, section.num_steps}}
    assert set(golden["checkpoints"]) == expected, f"recipe changed? run {REGENERATE}"
    assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", str(v)) for v in golden["checkpoints"].values())
    assert set(golden["eval"]) == set(params.train_stages)


def test_readme_carries_the_golden_eval_numbers() -> None:
    """The README's golden table is the eval section of tiny.json, to the printed digits."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split("<!-- golden-eval -->")[1]
    rows = {
        cells[0]: cells[1:]
        for line in block.splitlines()
        if line.startswith("| ") and not line.startswith("| stage")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    metrics = ("arithmetic_exact_match", "arithmetic_format_rate", "heldout_loss")
    for stage, values in _golden()["eval"].items():
        assert isinstance(values, dict)
        want = [f"{100 * float(values[m]):.1f} %" for m in metrics[:2]]
        want.append(f"{float(values[metrics[2]]):.3f}")
        assert rows[stage] == want, f"README golden table is stale; run {REGENERATE}"


def _skip_unless_confirmed() -> None:
    vendor = cpu_fingerprint().get("cpu.vendor", "?")
    if vendor not in _confirmed_vendors() and os.environ.get("OPENRELEASE_GOLDEN") != "1":
        pytest.skip(
            f"tests/golden/tiny.json is not yet confirmed on a {vendor} CPU: run `make golden` "
            f"here, and on a pass `{REGENERATE} --check --confirm` (README 'Golden digests')"
        )


@pytest.mark.slow
@pytest.mark.golden
def test_the_kernels_training_relies_on_give_the_golden_digests() -> None:
    """Under the recipe's pins, each kernel of tests/golden/kernel_digests.py gives tiny.json's
    bytes; when the checkpoint replay fails on a CPU, this names the kernels that moved."""
    _skip_unless_confirmed()
    from golden.kernel_digests import under_pins

    here, golden = under_pins(RECIPE), _golden()["kernels"]
    assert set(here) == set(golden), f"kernel_digests.py changed? run {REGENERATE}"
    moved = sorted(k for k in golden if here[k] != golden[k])
    assert not moved, f"on {cpu_fingerprint()['cpu.model']} these kernels give other bits: {moved}"


@pytest.mark.slow
@pytest.mark.golden
def test_tiny_pretrain_first_checkpoint_matches_the_golden_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny recipe's pretrain to its first checkpoint, 2 gloo ranks, portable mode.

    Run under ``ATEN_CPU_CAPABILITY=default`` in the caller's environment: the launcher's pins
    must win, so the bytes are the golden ones whatever the caller set.
    """
    _skip_unless_confirmed()
    from openrelease.data.stage import build_data
    from openrelease.reproduce.replay import run_replay

    shutil.copy(RECIPE, tmp_path / "params.yaml")
    params = load_params(tmp_path / "params.yaml")
    build_data(params.data, seed=params.seed, project_dir=tmp_path)
    first = params.pretrain.checkpoint_every
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    replayed = run_replay(tmp_path, "pretrain", params, stop_at_step=first, world_size=2)
    assert replayed.fingerprint["torch.cpu_capability"] == "AVX2"
    meta = read_model(
        Workspace(tmp_path).checkpoint("pretrain", first) / CHECKPOINT_META, CheckpointMeta
    )
    weights = next(f.sha256 for f in meta.files if f.path == WEIGHTS)
    key = f"pretrain/step-{first}"
    assert weights == _golden()["checkpoints"][key], (
        f"{key} is {weights} on {cpu_fingerprint()['cpu.model']}, not the golden digest: if the "
        f"recipe, the data or the training code changed on purpose, run {REGENERATE}; "
        "otherwise bit-identity across machines is broken (report this CPU, with what "
        "test_the_kernels_training_relies_on_give_the_golden_digests says moved)."
    )
