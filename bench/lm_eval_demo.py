"""Time the tiny recipe's lm-eval part against the built-in eval of the same checkpoints.

Run in a workspace after `make demo` (or `dvc repro grpo`): python bench/lm_eval_demo.py [--params
params.yaml]. Scores the final checkpoint of each stage (the recipe's `checkpoints: finals`) with
`eval.lm_eval`, and runs the built-in metrics on the same checkpoints; prints one JSON line with
both wall and CPU seconds and the ratio (goal: the lm-eval part adds under about 30 s to the demo).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from openrelease.data.store import DataStore
from openrelease.eval.harness import plan_harness
from openrelease.eval.stage import evaluate_checkpoint
from openrelease.layout import Workspace
from openrelease.manifest import StageManifest, read_model
from openrelease.params import STAGES, load_params


def _clock() -> tuple[float, float]:
    """(wall, cpu) seconds now; CPU time is the robust one on a shared machine."""
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    now = _clock()
    return now[0] - start[0], now[1] - start[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    project = Path.cwd()
    params = load_params(args.params)
    manifests = {
        s: read_model(p, StageManifest)
        for s in STAGES
        if (p := Workspace(project).stage_manifest(s)).is_file()
    }
    finals = [project / m.final_checkpoint for m in manifests.values()]
    store = DataStore(project / params.data.out_dir)
    start = _clock()
    checkpoints = {s: m.checkpoints for s, m in manifests.items()}
    plan = plan_harness(params.eval.lm_eval, checkpoints, project_dir=project)
    assert plan is not None, "eval.lm_eval.tasks is empty"
    for checkpoint in finals:
        plan.score(checkpoint)
    lm_wall, lm_cpu = _since(start)
    start = _clock()
    for checkpoint in finals:
        evaluate_checkpoint(checkpoint, store=store, params=params.eval, project_dir=project)
    builtin_wall, builtin_cpu = _since(start)
    result = {
        "bench": "lm_eval_demo",
        "cores": len(os.sched_getaffinity(0)),
        "checkpoints": len(finals),
        "tasks": list(params.eval.lm_eval.tasks),
        "limit": params.eval.lm_eval.limit,
        "lm_eval_wall_s": round(lm_wall, 2),
        "lm_eval_cpu_s": round(lm_cpu, 2),
        "builtin_eval_wall_s": round(builtin_wall, 2),
        "builtin_eval_cpu_s": round(builtin_cpu, 2),
        "ratio_cpu": round(lm_cpu / builtin_cpu, 3),
        "goal_s": 30,
    }
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
