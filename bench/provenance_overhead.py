"""Provenance overhead: the same tiny pretrain with recording on and off, side by side.

Each run is a fresh training process (``--child``) on a fresh copy of one project (its data and
a migrated embedded MLflow store), timing `openrelease.train.run_stage` inside it. Recording on
is what `openrelease launch` does: the trainer journals (StageTracker, record.json) and a recorder
process beside it (`openrelease.record.recorder`) sends the journal to MLflow; recording off is
``record=False`` (no tracker, no recorder). Runs alternate on/off after one untimed warm-up pair.
Each training process reports whether ``mlflow`` ever entered its ``sys.modules``.

Prints one JSON line: per-pair ratios and their median (goal <= 1.02), medians, the end-to-end
ratio (process start to the recorder's last drain), the recorder's tail after training, the time
the training thread spends in StageTracker calls (and its fraction of the run: a bound on the
in-process overhead that machine noise does not blur), and the sys.modules check.

Run: python bench/provenance_overhead.py [--steps 200] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    """``lscpu``'s model name (or what the platform says)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def make_project(root: Path, *, steps: int) -> Path:
    """pipelines/tiny.yaml with a ``steps``-step pretrain on one process, and its data."""
    from mlflow import MlflowClient

    from openrelease.data.stage import build_data
    from openrelease.params import load_params

    raw = yaml.safe_load((REPO_ROOT / "pipelines" / "tiny.yaml").read_text())
    raw["compute"].update(launcher="python", nproc_per_node=1)
    raw["pretrain"].update(
        num_steps=steps, warmup_steps=max(1, steps // 10), checkpoint_every=max(1, steps // 3)
    )
    project = root / "template"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(project / "params.yaml")
    build_data(params.data, seed=params.seed, project_dir=project)
    MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}").search_experiments()
    return project


TRACKER_METHODS = ("__init__", "start", "log_metrics", "log_checkpoint", "finish")


def _timed(fn: Callable[..., Any], spent: list[float]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    return wrapper


def child(project: Path, *, recorded: bool) -> None:
    """One training process: run the stage, print its wall time and its mlflow modules."""
    t_import = time.perf_counter()
    from openrelease import train
    from openrelease.params import load_params
    from openrelease.record.tracking import StageTracker
    from openrelease.train import checkpoint as ckpt

    spent = [0.0]
    for name in TRACKER_METHODS:  # time the recording done on the training thread
        setattr(StageTracker, name, _timed(getattr(StageTracker, name), spent))
    params = load_params(project / "params.yaml")
    t0 = time.perf_counter()
    report = train.run_stage("pretrain", params, project_dir=project, record=recorded)
    seconds = time.perf_counter() - t0
    result = {
        "seconds": seconds,
        "tracker_s": spent[0],
        "import_s": t0 - t_import,
        "final_step": report.final_step,
        "digest": ckpt.final_checkpoint(project, "pretrain")[1].checkpoint_digest,
        "mlflow_modules": sorted(m for m in sys.modules if m.split(".")[0] == "mlflow"),
    }
    sys.stdout.write(json.dumps(result) + "\n")


def one_run(template: Path, work: Path, *, recorded: bool) -> dict[str, Any]:
    """One training process on a new copy of ``template`` (with a recorder when recorded)."""
    from openrelease.layout import Workspace
    from openrelease.params import load_params
    from openrelease.record.recorder import start_recorder, stop_recorder
    from openrelease.record.tracking import stage_run_key, tracking_uri

    shutil.copytree(template, work)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    argv = [sys.executable, __file__, "--child", "on" if recorded else "off", str(work)]
    t0 = time.perf_counter()
    rec = None
    if recorded:
        params = load_params(work / "params.yaml")
        rec = start_recorder(
            work,
            stage_run_key(work, params, "pretrain"),
            tracking_uri=tracking_uri(work),
            record_path=Workspace(work).record("pretrain"),
        )
    proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, check=False)
    trained = time.perf_counter()
    if rec is not None:
        stop_recorder(rec)
    done = time.perf_counter()
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = trained - t0
    result["end_to_end_s"] = done - t0
    result["recorder_tail_s"] = done - trained
    if recorded:
        result["mlflow_status"] = _recorded_status(work)
    return result


def _recorded_status(project: Path) -> str:
    """The stage run's status in the project's MLflow store (FINISHED when all went in)."""
    from mlflow import MlflowClient

    from openrelease.manifest import StageRecord, read_model

    record = read_model(project / "artifacts/pretrain/record.json", StageRecord)
    if record.run_id is None:
        return "not sent"
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(record.run_id)
    return f"{run.info.status}, {len(run.outputs.model_outputs)} LoggedModels"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="pretrain steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="timed pairs (>= 3)")
    ap.add_argument("--machine", default=None, help="default: lscpu's model name")
    ap.add_argument("--out", type=Path, help="also write the JSON line to this file")
    ap.add_argument("--child", nargs=2, metavar=("on|off", "PROJECT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[1]), recorded=args.child[0] == "on")
        return
    logging.basicConfig(level=logging.WARNING)
    import torch

    from openrelease.params import load_params

    runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    pair_ratios: list[float] = []
    digests = set()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        template = make_project(root, steps=args.steps)
        for i in range(args.repeats + 1):  # pair 0 warms up both paths; not timed
            order = (True, False) if i % 2 else (False, True)
            pair: dict[bool, dict[str, Any]] = {}
            for recorded in order:
                work = root / f"run-{i}-{'on' if recorded else 'off'}"
                pair[recorded] = one_run(template, work, recorded=recorded)
                shutil.rmtree(work)
                digests.add(pair[recorded]["digest"])
            if i == 0:
                continue
            for recorded, result in pair.items():
                runs[recorded].append(result)
            pair_ratios.append(pair[True]["seconds"] / pair[False]["seconds"])
        params = load_params(template / "params.yaml")

    def med(recorded: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs[recorded])

    on, off = med(True, "seconds"), med(False, "seconds")
    result = {
        "bench": "provenance_overhead",
        "machine": args.machine or machine(),
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "stage": "pretrain",
        "steps": args.steps,
        "checkpoints": args.steps // params.pretrain.checkpoint_every,
        "model": params.model.model_dump(include={"hidden_size", "num_layers"}),
        "seq_len": params.pretrain.seq_len,
        "global_batch_size": params.pretrain.global_batch_size,
        "num_threads": params.compute.num_threads,
        "repeats": args.repeats,
        "recorded_s": [round(r["seconds"], 3) for r in runs[True]],
        "unrecorded_s": [round(r["seconds"], 3) for r in runs[False]],
        "pair_ratios": [round(r, 4) for r in pair_ratios],
        "ratio": round(statistics.median(pair_ratios), 4),
        "ratio_of_medians": round(on / off, 4),
        "goal": 1.02,
        "median_recorded_s": round(on, 3),
        "median_unrecorded_s": round(off, 3),
        "end_to_end_ratio": round(med(True, "end_to_end_s") / med(False, "end_to_end_s"), 4),
        "median_recorder_tail_s": round(med(True, "recorder_tail_s"), 3),
        "median_tracker_s": round(med(True, "tracker_s"), 3),
        "tracker_fraction": round(med(True, "tracker_s") / on, 4),
        "training_process_mlflow_modules": sorted(
            {m for r in runs[True] + runs[False] for m in r["mlflow_modules"]}
        ),
        "mlflow_status": sorted({r["mlflow_status"] for r in runs[True]}),
        "same_final_digest": len(digests) == 1,
    }
    line = json.dumps(result, sort_keys=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    sys.stdout.write(line + "\n")


if __name__ == "__main__":
    main()
