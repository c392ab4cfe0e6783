"""`reproduce` and `certify`: replay recorded stretches of real tiny runs and compare sha256."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from openrelease.errors import ArtifactError
from openrelease.layout import PORTABLE_STATE_FILES
from openrelease.manifest import BundleManifest, ReproCertificate, read_model
from openrelease.params import load_params
from openrelease.release.bundle import build_bundle
from openrelease.reproduce.run import certify, reproduce


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, built_project: Path) -> Path:
    """All four stages and eval, in-process on one rank; pretrain keeps states 2, 4, 6 and 8.

    Treat as read-only: tests that change it work on a copy.
    """
    from openrelease.eval.stage import run_eval_stage
    from openrelease.train import run_stage

    project = tmp_path_factory.mktemp("reproduce") / "ws"
    shutil.copytree(built_project, project)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["pretrain"].update(state_every=2, keep_last_states=4)
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(project / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        for stage in ("pretrain", "sft", "dpo", "distill", "grpo"):
            assert not run_stage(stage, params, project_dir=project).interrupted
        run_eval_stage(params, project_dir=project)
    return project


@pytest.fixture
def ws(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained workspace."""
    dst = tmp_path / "ws"
    shutil.copytree(trained, dst, symlinks=True)
    return dst


def _tree(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under ``root`` (the test of "nothing was touched")."""
    return {
        p.relative_to(root).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_pretrain_replay_is_identical_and_leaves_the_workspace_untouched(
    trained: Path, tmp_path: Path
) -> None:
    before = _tree(trained)
    phases: list[str] = []
    report = reproduce(trained, stage="pretrain", work_dir=tmp_path, progress=phases.append)
    assert _tree(trained) == before
    assert (report.layout, report.from_step, report.to_step) == ("workspace", 6, 8)
    assert report.identical, report.model_dump_json(indent=2)
    assert all(f.same for f in report.files)
    assert report.weights().replayed == report.weights().recorded
    assert report.recorded_digest == report.replayed_digest
    assert (report.drift, report.max_abs_delta, report.meta_differences) == ((), 0.0, ())
    assert [p.step for p in report.losses] == [7, 8]
    assert all(p.recorded == p.replayed is not None for p in report.losses)
    assert report.max_loss_delta == 0.0
    assert (report.world_size, report.replay_world_size, report.num_threads) == (1, 1, 1)
    assert report.device == report.replay_device and report.device.startswith("cpu (")
    assert [p.split()[0] for p in phases] == ["preparing", "replaying", "comparing"]
    assert not list(tmp_path.iterdir())  # the scratch workspace is gone


def test_sft_replay_from_its_initial_weights(trained: Path) -> None:
    report = reproduce(trained, stage="sft", from_step=0, to_step=4)
    assert (report.from_step, report.to_step, report.identical) == (0, 4, True)
    assert [p.step for p in report.losses] == [1, 2, 3, 4]


def test_grpo_replay_is_identical(trained: Path) -> None:
    report = reproduce(trained, stage="grpo")
    assert (report.from_step, report.to_step) == (2, 4)
    assert report.identical, report.model_dump_json(indent=2)
    assert report.max_loss_delta == 0.0


def test_tampered_checkpoint_and_metrics_give_the_drift(ws: Path) -> None:
    folder = ws / "artifacts/pretrain/checkpoints/step-8"
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1e-3
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    metrics = ws / "artifacts/pretrain/metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows[-1]["loss"] += 0.5
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))

    report = reproduce(ws, stage="pretrain", from_step=4, to_step=8)
    assert not report.identical
    row = report.weights()
    assert row.recorded == row.replayed != row.found  # the replay matches meta.json, not the file
    drift = {d.name: d.max_abs_delta for d in report.drift}
    assert drift["model.norm.weight"] == pytest.approx(1e-3, rel=1e-2)
    assert {v for k, v in drift.items() if k != "model.norm.weight"} == {0.0}
    assert report.max_abs_delta == drift["model.norm.weight"]
    assert report.max_loss_delta == pytest.approx(0.5)
    assert [p.step for p in report.losses] == [5, 6, 7, 8]
    assert any("model.safetensors does not match its meta.json" in n for n in report.notes)


def test_missing_state_names_the_steps_a_replay_can_start_from(ws: Path) -> None:
    with pytest.raises(ArtifactError, match=r"replay can start from steps 0, 2, 4, 6; pretrain\."):
        reproduce(ws, stage="pretrain", from_step=3)
    with pytest.raises(ArtifactError, match=r"checkpoints at steps 4, 8; --to-step must be"):
        reproduce(ws, stage="pretrain", from_step=2, to_step=6)
    shutil.rmtree(ws / "artifacts/sft/states")  # only release checkpoints left
    with pytest.raises(ArtifactError, match=r"no sft training state at step 2: .* steps 0;"):
        reproduce(ws, stage="sft", from_step=2)


def test_certificate_goes_into_the_bundle_and_a_bundle_replays(ws: Path, tmp_path: Path) -> None:
    params = load_params(ws / "params.yaml")
    certificate = certify(ws, params)
    assert read_model(ws / "artifacts/certificate.json", ReproCertificate) == certificate
    spans = [(r.stage, r.from_step, r.to_step, r.identical) for r in certificate.replays]
    assert spans == [
        ("pretrain", 6, 8, True),
        ("sft", 2, 4, True),
        ("dpo", 2, 4, True),
        ("distill", 2, 4, True),
        ("grpo", 2, 4, True),
    ]
    assert all(r.weights_sha256 == r.replayed_weights_sha256 for r in certificate.replays)

    out = tmp_path / "release"
    report = build_bundle(ws, out, params=params)
    files = {f.path for f in read_model(out / "MANIFEST.json", BundleManifest).files}
    assert "certificate.json" in files
    # release.retention keeps the last state; the certificate adds the ones its replays start from
    states = {f.split("/")[2] for f in files if f.startswith("states/pretrain/")}
    assert states == {"step-6", "step-8"}
    # ... in their pickle-free form only: safetensors + JSON, no DCP metadata, no torch.save
    state_files = {f.split("/")[3] for f in files if f.startswith("states/")}
    assert state_files == set(PORTABLE_STATE_FILES)
    card = (out / "README.md").read_text()
    sha = certificate.replays[0].weights_sha256[:23]
    assert f"- pretrain steps 6..8 replayed: identical sha256 (`{sha}...`)" in card
    assert not [w for w in report.warnings if "certificate" in w]

    before = _tree(out)
    from_bundle = reproduce(out, stage="pretrain")
    assert (from_bundle.layout, from_bundle.from_step, from_bundle.identical) == ("bundle", 6, True)
    grpo = reproduce(out, stage="grpo")
    assert (grpo.from_step, grpo.to_step, grpo.identical) == (2, 4, True)
    assert _tree(out) == before
    _crafted_pickle_in_a_bundle_state_runs_nothing(out, tmp_path)
    with pytest.raises(ArtifactError, match=r"steps 0, 6; release\.retention\.state_every_k"):
        reproduce(out, stage="pretrain", from_step=4)

    # A certificate of other checkpoints is left out, with a warning.
    stale = certificate.model_copy(
        update={"replays": (certificate.replays[0].model_copy(update={"recorded_digest": "x"}),)}
    )
    (ws / "artifacts/certificate.json").write_text(stale.model_dump_json())
    again = build_bundle(ws, tmp_path / "release2", params=params)
    assert any("certificate.json is left out" in w for w in again.warnings)
    assert not (tmp_path / "release2/certificate.json").exists()
    assert "## Reproducibility" not in (tmp_path / "release2/README.md").read_text()


@pytest.mark.slow
def test_two_process_run_replays_under_torchrun(project: Path) -> None:
    # Recorded by the replay worker run to the end: `openrelease train` minus MLflow (10 s less).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "openrelease.reproduce.replay", "pretrain", str(project), "8", "report.json"]
    done = subprocess.run(cmd, cwd=project, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (project / "artifacts/pretrain/manifest.json").is_file()

    report = reproduce(project, stage="pretrain")
    assert (report.from_step, report.to_step) == (4, 8)
    assert (report.world_size, report.replay_world_size) == (2, 2)
    assert report.identical, report.model_dump_json(indent=2)

    # The pickle-free form a bundle ships, resharded onto 2 ranks, replays to the same bytes.
    from openrelease.train.portable import export_state

    state = project / "artifacts/pretrain/states/step-4"
    portable = export_state(state, project / "portable-step-4")
    assert {p.name for p in state.iterdir()} >= {".metadata"}  # the DCP state is left as it was
    shutil.rmtree(state)
    portable.rename(state)  # the state folder now holds exactly what a bundle would
    assert {p.name for p in state.iterdir()} == set(PORTABLE_STATE_FILES)
    again = reproduce(project, stage="pretrain")
    assert (again.from_step, again.replay_world_size, again.identical) == (4, 2, True)


def test_cli_reproduce_identical_then_drift_exits_1(ws: Path) -> None:
    from typer.testing import CliRunner

    from openrelease.cli import app

    runner = CliRunner()
    args = ["reproduce", str(ws), "--stage", "pretrain", "--from-step", "4", "--to-step", "8"]
    ok = runner.invoke(app, [*args, "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["identical"] is True
    folder = ws / "artifacts/pretrain/checkpoints/step-8"
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    drift = runner.invoke(app, args)
    assert drift.exit_code == 1
    assert "drift" in drift.stdout and "model.norm.weight" in drift.stdout
    missing = runner.invoke(app, [*args[:4], "--from-step", "3"])
    assert missing.exit_code == 1 and "replay can start from steps" in missing.stderr


class _RunsCode:
    """Unpickling this runs ``touch <path>``: a stand-in for a malicious pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.path}",))


def _crafted_pickle_in_a_bundle_state_runs_nothing(bundle: Path, tmp_path: Path) -> None:
    """A stranger's bundle whose state carries DCP metadata (a pickle): refused, nothing runs."""
    from typer.testing import CliRunner

    from openrelease.cli import app

    hostile = tmp_path / "hostile"
    shutil.copytree(bundle, hostile)
    sentinel = tmp_path / "pwned"
    state = hostile / "states/pretrain/step-6"
    (state / ".metadata").write_bytes(pickle.dumps(_RunsCode(sentinel)))
    for name in ("model-state.safetensors", "optim-state.safetensors"):
        (state / name).unlink()  # a DCP-only state, as an older or crafted bundle has
    result = CliRunner().invoke(app, ["reproduce", str(hostile), "--stage", "pretrain"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "states/pretrain/step-6 holds '.metadata'" in lines[0]
    assert "pickle-free" in lines[0] and "nothing ran" in lines[0]
    assert not sentinel.exists()


@pytest.mark.slow
def test_replay_under_other_kernels_drifts_and_json_names_the_fingerprint_difference(
    ws: Path,
) -> None:
    """deterministic: true (the test recipe) replayed with ATen's baseline kernels: a drift that
    `reproduce --json` explains by the kernel ISA (on every x86-64 CPU: DEFAULT is below AVX2)."""
    record = json.loads((ws / "artifacts/pretrain/record.json").read_text())
    recorded = record["fingerprint"]["torch.cpu_capability"]
    if recorded == "DEFAULT":
        pytest.skip("this CPU already runs ATen's baseline kernels; nothing to force")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    args = ["reproduce", str(ws), "--stage", "pretrain", "--from-step", "6", "--to-step", "8"]
    done = subprocess.run(
        [sys.executable, "-m", "openrelease", *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["identical"] is False and report["deterministic"] == "true"
    diffs = {d["key"]: d for d in report["fingerprint_differences"]}
    assert diffs["torch.cpu_capability"] == {
        "key": "torch.cpu_capability",
        "recorded": recorded,
        "replayed": "DEFAULT",
        "explains": True,
    }
    assert diffs["env.ATEN_CPU_CAPABILITY"]["replayed"] == "default"
    assert f"torch.cpu_capability: {recorded} -> DEFAULT" in report["explanation"]


def test_doctored_record_lists_the_fingerprint_differences(ws: Path) -> None:
    """A record made on another CPU: an identical replay still lists what differs."""
    path = ws / "artifacts/pretrain/record.json"
    record = json.loads(path.read_text())
    fp = record["fingerprint"]
    assert fp["compute.deterministic"] == "true" and fp["job.world_size"] == "1"
    # Another vendor and model than this machine's, whichever this machine is.
    vendor = "GenuineIntel" if fp.get("cpu.vendor") == "AuthenticAMD" else "AuthenticAMD"
    fp.update({"cpu.model": "Doctored CPU 9999", "cpu.vendor": vendor})
    fp["torch.threads"] = "4"
    path.write_text(json.dumps(record))
    report = reproduce(ws, stage="pretrain", from_step=6, to_step=8)
    assert report.identical and report.explanation is None
    diffs = {d.key: (d.recorded, d.explains) for d in report.fingerprint_differences}
    assert diffs["cpu.model"] == ("Doctored CPU 9999", True)  # unpinned kernels
    assert diffs["cpu.vendor"] == (vendor, True)
    assert diffs["torch.threads"] == ("4", True)
    assert "torch.cpu_capability" not in diffs
