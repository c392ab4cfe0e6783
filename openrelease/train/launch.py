"""The command that starts a training stage, built from ComputeParams (python, torchrun or srun).

`dvc.yaml` and the README use it so a recipe switches launchers by params alone.
"""

from __future__ import annotations

from openrelease.params import ComputeParams, StageName


def launch_command(
    compute: ComputeParams, *, stage: StageName, params_path: str = "params.yaml"
) -> list[str]:
    """Return the argv that runs ``openrelease train <stage>`` on every process of the job.

    Args:
        compute: The ``compute`` section (launcher, processes per node, nodes, rendezvous).
        stage: The training stage to run.
        params_path: The params file every process reads.

    Returns:
        ``python -m openrelease ...`` for one process; ``torchrun`` with ``--standalone`` on
        one node or c10d rendezvous at ``rdzv_endpoint`` on several; or ``srun`` with one task
        per process (ranks come from SLURM_PROCID, the store from ``rdzv_endpoint``).
    """
    entry = ["-m", "openrelease", "train", stage, "--params", params_path]
    match compute.launcher:
        case "python":
            return ["python", *entry]
        case "torchrun":
            where = ["--standalone"]
            if compute.nnodes > 1:
                where = ["--rdzv-backend", "c10d", "--rdzv-endpoint", str(compute.rdzv_endpoint)]
            return [
                "torchrun",
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
