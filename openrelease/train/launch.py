"""The one builder of the argv that starts training processes (python, torchrun or srun).

`launch_command` gives the command of a training stage from ComputeParams, so a recipe switches
launchers by params alone: in its portable form (``python``, ``torchrun``) for ``train --dry-run``
and the README, or resolved to this interpreter for ``openrelease launch``. `launcher_argv` puts
any ``-m module ...`` entry under a launcher; the replay (openrelease.reproduce.replay) uses it
for its worker. `launch_env` gives the environment of those processes: the kernel pins of
``compute.deterministic`` (`determinism_env`), which must be in place before torch starts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping, Sequence

from openrelease.params import ComputeParams, StageName

PORTABLE_CPU_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
"""What ``compute.deterministic: portable`` pins on CPU, before torch starts in every rank.

Each library compiles its kernels for several ISAs and picks one at run time, by ISA and for
MKL also by CPU vendor. The pins choose code paths every x86-64 CPU runs the same way (tiny
recipe's Llama, 20 AdamW steps, 1 thread, sha256 of the weights; bench/kernel_pins.py):

- ATen (``ATEN_CPU_CAPABILITY=avx2``): its AVX-512 and AVX2 kernels give different weights
  (Intel Xeon with AVX-512, 2026-12-02; AMD EPYC Zen 5 with AVX-512, 2026-12-03). AVX2 is what
  every x86-64 CPU since 2013 (Haswell, Zen 1) has; ATen dispatches by ISA only, not vendor.
- MKL (``MKL_CBWR=COMPATIBLE``, conditional numerical reproducibility): MKL dispatches by vendor
  as well. On Intel, ``MKL_CBWR=AVX2`` selects Intel's AVX2 CNR branch (it moved the bits there,
  as did ``AVX2,STRICT``); on AMD, MKL ignores every branch but ``AUTO`` and ``COMPATIBLE``
  (measured on the Zen 5: unset, ``AVX2``, ``AVX2,STRICT``, ``SSE4_2`` and ``AVX512`` give one
  result, ``COMPATIBLE`` another), which is what oneMKL's developer guide documents: only
  ``COMPATIBLE`` gives the same results on Intel and non-Intel CPUs. So ``AVX2`` would be
  portable between AMD machines (the digests made that way held from Zen 3 to Zen 5) but not
  between vendors; ``COMPATIBLE`` is, for BLAS. Its cost on the tiny pretrain: wall ratio 1.385
  vs native on the Zen 5 (``AVX2``: 1.0), bench/portable_kernels.py.
- MKL's vector math (VML: ``torch.sqrt``, ``exp``, ``log``, ``tanh``, ``erf`` on CPU) ignores
  ``MKL_CBWR`` on AMD (gdb on the Zen 5: sqrt and exp ran the generic ``EX`` kernels under
  ``COMPATIBLE``, ``AUTO`` and ``AVX2``), and its float sqrt, log10 and log2 kernels start
  from ``rsqrtps``/``rcpps``, approximations whose bits differ between CPU vendors. No pin
  fixes that, so training avoids them: AdamW's sqrt is IEEE (train/adamw.py), and
  tests/test_adamw.py checks that a training step reaches none of them. With torch's own AdamW
  the tiny recipe's digests made on the Zen 5 did not hold on an Intel Xeon (family 6 model
  167, 2026-12-04), whatever MKL was told.
- oneDNN (``ONEDNN_MAX_CPU_ISA=AVX2``): no effect on fp32 training (it does not reach oneDNN).
  Pinned anyway, at no measured cost, because bf16 matmuls and convolutions do reach it and
  pick AVX-512/AMX kernels by ISA.

The thread count changes bits too (1 vs 2 threads differ), which is why ``compute.num_threads``
is part of the recipe. See README "Portable determinism" and bench/portable_kernels.py.
"""
CUDA_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
"""Deterministic cuBLAS GEMMs need a fixed workspace, set before the first cuBLAS call."""


def determinism_env(compute: ComputeParams) -> dict[str, str]:
    """The environment ``compute.deterministic`` pins in every rank (empty under ``false``).

    ``portable``: the CPU kernel ISA (`PORTABLE_CPU_ENV`); ``true`` and ``portable`` on a
    device that may be CUDA: the cuBLAS workspace (`CUDA_ENV`). NCCL settings are not pinned;
    the fingerprint records every ``NCCL_*`` variable a run had.
    """
    mode = compute.determinism
    env: dict[str, str] = {}
    if mode == "false":
        return env
    if mode == "portable":
        env.update(PORTABLE_CPU_ENV)
    if compute.device != "cpu":
        env.update(CUDA_ENV)
    return env


def launch_env(compute: ComputeParams, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the training processes: ``environ`` plus the determinism pins.

    The pins win over ``environ`` (a stray ``ATEN_CPU_CAPABILITY`` cannot undo portability);
    ``OMP_NUM_THREADS`` defaults to ``compute.num_threads`` (the trainer sets threads too).
    """
    base = dict(os.environ if environ is None else environ)
    return {"OMP_NUM_THREADS": str(compute.num_threads), **base, **determinism_env(compute)}


def pin_environment(
    compute: ComputeParams, environ: MutableMapping[str, str] | None = None
) -> None:
    """Set the determinism pins in this process (call before torch runs its first op)."""
    (os.environ if environ is None else environ).update(determinism_env(compute))


def train_entry(stage: StageName, params_path: str = "params.yaml") -> list[str]:
    """``-m openrelease train <stage> --params <params_path>``: what every process runs."""
    return ["-m", "openrelease", "train", stage, "--params", params_path]


def launcher_argv(
    compute: ComputeParams, entry: Sequence[str], *, resolve: bool = False
) -> list[str]:
    """Return the argv that runs ``entry`` on every process of the job ``compute`` describes.

    Args:
        compute: The ``compute`` section (launcher, processes per node, nodes, rendezvous).
        entry: What each process runs after ``python`` (``-m module args...``).
        resolve: Start the interpreter running this code (``sys.executable``, and torchrun as
            ``sys.executable -m torch.distributed.run``), so a venv need not be on PATH; srun
            keeps ``python``, which each node resolves. False: the portable form.

    Returns:
        ``python ...`` for one process; ``torchrun`` with ``--standalone`` on one node or c10d
        rendezvous at ``rdzv_endpoint`` on several; or ``srun`` with one task per process
        (ranks come from SLURM_PROCID, the store from ``rdzv_endpoint``).
    """
    match compute.launcher:
        case "python":
            return [sys.executable if resolve else "python", *entry]
        case "torchrun":
            torchrun = [sys.executable, "-m", "torch.distributed.run"] if resolve else ["torchrun"]
            where = ["--standalone"]
            if compute.nnodes > 1:
                where = ["--rdzv-backend", "c10d", "--rdzv-endpoint", str(compute.rdzv_endpoint)]
            return [
                *torchrun,
                "--nnodes",
                str(compute.nnodes),
                "--nproc-per-node",
                str(compute.nproc_per_node),
                *where,
                *entry,
            ]
        case "srun":
            return [
                "srun",
                "--nodes",
                str(compute.nnodes),
                "--ntasks-per-node",
                str(compute.nproc_per_node),
                "python",
                *entry,
            ]


def launch_command(
    compute: ComputeParams,
    *,
    stage: StageName,
    params_path: str = "params.yaml",
    resolve: bool = False,
) -> list[str]:
    """Return the argv that runs ``openrelease train <stage>`` on every process of the job.

    Args:
        compute: The ``compute`` section.
        stage: The training stage to run.
        params_path: The params file every process reads.
        resolve: The argv ``openrelease launch`` runs (this interpreter; see `launcher_argv`);
            False: the portable form ``train --dry-run`` prints.
    """
    return launcher_argv(compute, train_entry(stage, params_path), resolve=resolve)
