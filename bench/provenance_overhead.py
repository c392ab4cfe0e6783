"""Provenance overhead: the same tiny pretrain with recording on and off, side by side.

Recording on is `openrelease.train.run_stage` (StageTracker: MLflow through the journal, plus
record.json); recording off is the same call with ``record=False`` (no tracker, no recorder).
Runs alternate on/off in one process after one warm-up pair (so imports are paid by neither
side); each run starts from the same fresh project (no training state, a copy of one migrated
SQLite store). Prints one JSON line: medians, their ratio (goal <= 1.02) and where the
recording time went.

Run: python bench/provenance_overhead.py [--steps 60] [--repeats 5] [--out FILE]
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
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from openrelease import train
from openrelease.data.stage import build_data
from openrelease.params import load_params
from openrelease.record.tracking import StageTracker
from openrelease.train import checkpoint as ckpt

REPO_ROOT = Path(__file__).resolve().parent.parent
TRACKER_METHODS = ("__init__", "start", "log_metrics", "log_checkpoint", "finish")
spent: dict[str, float] = defaultdict(float)
"""Seconds spent inside each StageTracker method during the current run."""


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - t0

    return wrapper


def make_project(root: Path, *, steps: int) -> Path:
    """pipelines/tiny.yaml with a ``steps``-step pretrain on one process, and its data."""
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
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}").search_experiments()
    return project


def one_run(template: Path, work: Path, *, recorded: bool) -> tuple[float, str, dict[str, float]]:
    """Wall seconds of one pretrain run in ``work``, a new copy of ``template``; its digest.

    ``work`` must be a new path: MLflow caches one SQL engine per store URI.
    """
    shutil.copytree(template, work)
    params = load_params(work / "params.yaml")
    spent.clear()
    t0 = time.perf_counter()
    report = train.run_stage("pretrain", params, project_dir=work, record=recorded)
    seconds = time.perf_counter() - t0
    assert report.final_step == params.pretrain.num_steps
    assert not report.interrupted
    assert (work / "artifacts/pretrain/record.json").exists() == recorded
    digest = ckpt.final_checkpoint(work, "pretrain")[1].checkpoint_digest
    return seconds, digest, dict(spent)


def cold_import_s(module: str) -> float:
    """Seconds a fresh interpreter needs to import ``module`` (minus a bare start)."""

    def run(code: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - t0

    return statistics.median(run(f"import {module}") - run("pass") for _ in range(3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="pretrain steps per run")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each kind")
    ap.add_argument("--machine", default=platform.processor() or platform.machine())
    ap.add_argument("--out", type=Path, help="also write the JSON line to this file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    for name in TRACKER_METHODS:
        setattr(StageTracker, name, _timed(name, getattr(StageTracker, name)))

    times: dict[bool, list[float]] = {True: [], False: []}
    tracker_s: dict[str, list[float]] = defaultdict(list)
    digests = set()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        template = make_project(root, steps=args.steps)
        for i in range(args.repeats + 1):  # pair 0 warms up both paths; not timed
            order = (True, False) if i % 2 else (False, True)
            for recorded in order:
                work = root / f"run-{i}-{'on' if recorded else 'off'}"
                seconds, digest, parts = one_run(template, work, recorded=recorded)
                shutil.rmtree(work)
                digests.add(digest)
                if i == 0:
                    continue
                times[recorded].append(seconds)
                if recorded:
                    for name in TRACKER_METHODS:
                        tracker_s[name].append(parts.get(name, 0.0))
        params = load_params(template / "params.yaml")
    on, off = statistics.median(times[True]), statistics.median(times[False])
    result = {
        "bench": "provenance_overhead",
        "machine": args.machine,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "stage": "pretrain",
        "steps": args.steps,
        "checkpoints": args.steps // params.pretrain.checkpoint_every,
        "model": params.model.model_dump(include={"hidden_size", "num_layers"}),
        "seq_len": params.pretrain.seq_len,
        "global_batch_size": params.pretrain.global_batch_size,
        "num_threads": params.compute.num_threads,
        "repeats": args.repeats,
        "recorded_s": [round(t, 3) for t in times[True]],
        "unrecorded_s": [round(t, 3) for t in times[False]],
        "median_recorded_s": round(on, 3),
        "median_unrecorded_s": round(off, 3),
        "ratio": round(on / off, 4),
        "goal": 1.02,
        "median_tracker_s": {k: round(statistics.median(v), 3) for k, v in tracker_s.items()},
        "cold_import_mlflow_s": round(cold_import_s("mlflow"), 3),
        "same_final_digest": len(digests) == 1,
    }
    line = json.dumps(result, sort_keys=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    sys.stdout.write(line + "\n")


if __name__ == "__main__":
    main()
