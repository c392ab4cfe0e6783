"""The one builder of the argv that starts training processes (python, torchrun or srun).

`launch_command` gives the command of a training stage from ComputeParams, so a recipe switches
launchers by params alone: in its portable form (``python``, ``torchrun``) for ``train --dry-run``
and the README, or resolved to this interpreter for ``openrelease launch``. `launcher_argv` puts
any ``-m module ...`` entry under a launcher; the replay (openrelease.reproduce.replay) uses it
for its worker.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from openrelease.params import ComputeParams, StageName


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
