"""Portable determinism: the environment each launcher gets, the fingerprint and its comparison."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from project_paths import REPO_ROOT

from openrelease.errors import ParamsError
from openrelease.manifest import StageRecord, read_model
from openrelease.params import ComputeParams
from openrelease.record.fingerprint import compare, cpu_fingerprint, explain, fingerprint
from openrelease.reproduce.run import reproduce
from openrelease.train.launch import (
    CUDA_ENV,
    PORTABLE_CPU_ENV,
    determinism_env,
    launch_env,
)

XEON = {
    "vendor_id": "GenuineIntel",
    "model name": "Intel(R) Xeon(R) Processor",
    "cpu family": "6",
    "model": "167",
    "flags": "fpu sse4_2 avx avx2 fma avx512f avx512bw avx512vl avx512_bf16 amx_tile amx_bf16",
}
EPYC = {
    "vendor_id": "AuthenticAMD",
    "model name": "AMD EPYC 9654 96-Core Processor",
    "cpu family": "25",
    "model": "17",
    "flags": "fpu sse4_2 avx avx2 fma avx512f avx512bw avx512vl avx512_bf16",
}


def test_each_mode_builds_the_environment_of_its_ranks() -> None:
    portable = ComputeParams(device="cpu")
    assert portable.determinism == "portable"  # the default
    assert determinism_env(portable) == PORTABLE_CPU_ENV
    assert PORTABLE_CPU_ENV["ATEN_CPU_CAPABILITY"] == "avx2"
    # The pins win over a stray setting; other variables pass; threads default to the recipe's.
    stray = {"ATEN_CPU_CAPABILITY": "avx512", "PATH": "/bin", "MKL_CBWR": "AUTO"}
    env = launch_env(ComputeParams(device="cpu", num_threads=3), stray)
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "3", **PORTABLE_CPU_ENV}
    assert launch_env(portable, {"OMP_NUM_THREADS": "7"})["OMP_NUM_THREADS"] == "7"

    same_machine = ComputeParams(device="cpu", deterministic=True)
    assert same_machine.determinism == "true"
    assert determinism_env(same_machine) == {}
    assert launch_env(same_machine, stray)["ATEN_CPU_CAPABILITY"] == "avx512"  # left alone

    # A device that may be CUDA: the cuBLAS workspace, in both deterministic modes.
    gpu = ComputeParams(device="cuda", deterministic=True, precision="bf16")
    assert determinism_env(gpu) == CUDA_ENV == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert determinism_env(ComputeParams(device="auto")) == {**PORTABLE_CPU_ENV, **CUDA_ENV}
    fast = ComputeParams(device="cuda", deterministic=False)
    assert fast.determinism == "false" and determinism_env(fast) == {}
    with pytest.raises(ValueError, match="deterministic"):
        ComputeParams(deterministic="sometimes")  # type: ignore[arg-type]

    # `train --dry-run` shows the pins with the argv.
    from typer.testing import CliRunner

    from openrelease.cli import app

    recipe = str(REPO_ROOT / "pipelines" / "tiny.yaml")
    dry = CliRunner().invoke(app, ["train", "pretrain", "--dry-run", "--json", "--params", recipe])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["env"] == PORTABLE_CPU_ENV


@pytest.mark.slow
def test_portable_run_is_recorded_and_replays_identically_under_any_kernel_env(
    project: Path, template_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`openrelease launch` overrides a stray ISA setting and records the fingerprint; replays
    under ``ATEN_CPU_CAPABILITY`` unset (the machine's default), ``avx2`` and ``default`` all
    give the recorded sha256."""
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["compute"].update(launcher="python", nproc_per_node=1, deterministic="portable")
    raw["pretrain"].update(num_steps=4, checkpoint_every=2, state_every=2)
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.copy(template_db, project / "mlflow.db")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "NCCL_DEBUG": "WARN"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-m", "openrelease", "launch", "pretrain"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=project,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pins = " ".join(f"{k}={v}" for k, v in PORTABLE_CPU_ENV.items())
    assert f"$ {pins} {sys.executable} -m openrelease train pretrain" in done.stderr
    record = read_model(project / "artifacts/pretrain/record.json", StageRecord)
    fp = record.fingerprint
    assert fp["torch.cpu_capability"] in ("AVX2", "DEFAULT")  # DEFAULT: a CPU without AVX2
    assert {k: fp[f"env.{k}"] for k in PORTABLE_CPU_ENV} == PORTABLE_CPU_ENV
    assert (fp["compute.deterministic"], fp["job.world_size"], fp["torch.threads"]) == (
        "portable",
        "1",
        "1",
    )
    assert fp["env.NCCL_DEBUG"] == "WARN" and fp["cpu.model"] == cpu_fingerprint()["cpu.model"]
    # The MLflow run carries it as tags.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    tags = client.get_run(str(record.run_id)).data.tags
    assert tags["fingerprint.torch.cpu_capability"] == fp["torch.cpu_capability"]
    assert tags["fingerprint.cpu.isa"] == fp["cpu.isa"]

    for value in (None, "avx2", "default"):
        if value is None:
            monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
        else:
            monkeypatch.setenv("ATEN_CPU_CAPABILITY", value)
        report = reproduce(project, stage="pretrain", work_dir=project)
        assert (report.from_step, report.to_step, report.deterministic) == (2, 4, "portable")
        assert report.identical, (value, report.model_dump_json(indent=2))
        assert report.weights().replayed == report.weights().recorded
        # Only the NCCL_DEBUG the recorded launch had, which cannot change bits.
        (logging,) = report.fingerprint_differences
        assert (logging.key, logging.recorded, logging.explains) == (
            "env.NCCL_DEBUG",
            "WARN",
            False,
        )
        assert report.explanation is None


def test_portable_mode_refuses_a_process_whose_kernels_are_already_chosen() -> None:
    """In-process training (a library call) after torch picked non-AVX2 kernels fails fast."""
    code = (
        "import os, torch\n"
        "torch.ones(3).sum()\n"  # the first op fixes the kernel ISA
        "from openrelease.params import ComputeParams\n"
        "from openrelease.train.distributed import apply_determinism\n"
        "try:\n"
        "    apply_determinism(ComputeParams(device='cpu'), device=torch.device('cpu'))\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        "else:\n"
        "    print('OK', torch.backends.cpu.get_cpu_capability())\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(ParamsError.__name__), done.stdout
    assert "already runs DEFAULT CPU kernels" in done.stdout
    # Before the first op the pin still takes effect in the process itself.
    late = code.replace("torch.ones(3).sum()\n", "")
    done = subprocess.run(
        [sys.executable, "-c", late], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.stdout.strip() == "OK AVX2", done.stdout + done.stderr


def test_fingerprint_names_the_cpu_the_kernels_and_the_job() -> None:
    fp = fingerprint(world_size=2, nnodes=1, mode="portable", environ={"MKL_CBWR": "AVX2"})
    assert fp["torch.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert fp["torch.version"] == torch.__version__
    assert fp["torch.threads"] == str(torch.get_num_threads())
    assert fp["torch.blas"] == "mkl" and fp["torch.mkl"].startswith("20")
    assert fp["torch.onednn"].startswith("v")
    assert (fp["job.world_size"], fp["job.topology"]) == ("2", "1x2")
    assert fp["env.MKL_CBWR"] == "AVX2" and fp["compute.deterministic"] == "portable"
    assert fp["cpu.vendor"] and fp["cpu.model"]
    assert all(isinstance(v, str) for v in fp.values())
    cpu = cpu_fingerprint(XEON)
    assert (
        cpu["cpu.isa"]
        == "sse4_2,avx,avx2,fma,avx512f,avx512bw,avx512vl,avx512_bf16,amx_tile,amx_bf16"
    )
    assert (cpu["cpu.vendor"], cpu["cpu.family"]) == ("GenuineIntel", "6/167")
    # Secret-looking NCCL variables never enter it.
    env = fingerprint(world_size=1, environ={"NCCL_ALGO": "Ring", "NCCL_IB_TOKEN": "x"})
    assert env["env.NCCL_ALGO"] == "Ring" and "env.NCCL_IB_TOKEN" not in env


def test_compare_names_what_can_explain_a_drift() -> None:
    here = {
        **cpu_fingerprint(XEON),
        "torch.cpu_capability": "AVX2",
        "compute.deterministic": "portable",
    }
    there = {
        **cpu_fingerprint(EPYC),
        "torch.cpu_capability": "AVX2",
        "compute.deterministic": "portable",
    }
    diffs = {d.key: d for d in compare(here, there)}
    assert set(diffs) == {"cpu.vendor", "cpu.model", "cpu.family", "cpu.isa"}
    assert not any(d.explains for d in diffs.values())  # pinned kernels: the CPU does not matter
    assert "nondeterminism" in explain(list(diffs.values()))

    native = {**here, "compute.deterministic": "true", "torch.cpu_capability": "AVX512"}
    other = {**there, "compute.deterministic": "true", "torch.cpu_capability": "AVX2"}
    other["torch.threads"], other["cpu.count"] = "2", "96"
    diffs = {d.key: d for d in compare(native, other)}
    assert diffs["torch.cpu_capability"].explains and diffs["cpu.model"].explains
    assert diffs["torch.threads"].explains and not diffs["cpu.count"].explains
    sentence = explain(list(diffs.values()))
    assert "torch.cpu_capability: AVX512 -> AVX2" in sentence and "cpu.count" not in sentence
    assert compare({}, other) == [] and compare(native, native) == []
    assert json.loads(diffs["torch.threads"].model_dump_json())["replayed"] == "2"
