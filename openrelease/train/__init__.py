"""Training: one FSDP2 loop (loop.py) that every stage (stages.py) runs with its own job (job.py).

Run a stage with `openrelease launch <stage>`; the launcher argv comes from launch.py. What
callers outside the package use is re-exported here.
"""

from openrelease.train.job import TrainJob
from openrelease.train.loop import TrainReport
from openrelease.train.stages import (
    STAGE_SETUPS,
    StageSetup,
    main_from_cli,
    run_stage,
    stage_params_digest,
)

__all__ = [
    "STAGE_SETUPS",
    "StageSetup",
    "TrainJob",
    "TrainReport",
    "main_from_cli",
    "run_stage",
    "stage_params_digest",
]
