"""Benchmark `build_bundle`: hard links vs full copies vs a plain `cp -r` of the same files.

Trains a real workspace once (data, pretrain, sft, eval; one process, CPU), then times, side by
side, the bundle built with hard links, the bundle built with copies, and `cp -r` of the result.
Also reports the bytes the build hashed and how many of them were checkpoint files (goal: 0):
only training states, which have no recorded sha256, are hashed; a build without them shows
the cost of the bundle itself.

Run: python bench/bundle.py [--hidden-size 512] [--num-layers 8] [--repeats 3]
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from openrelease.params import PipelineParams, RetentionParams, load_params, validate_params
from openrelease.release import bundle as bundle_mod
from openrelease.release.bundle import BundleReport, build_bundle

REPO = Path(__file__).resolve().parent.parent


def _params(hidden_size: int, num_layers: int) -> PipelineParams:
    raw: dict[str, Any] = yaml.safe_load((REPO / "pipelines" / "tiny.yaml").read_text())
    raw["data"] |= {"synthetic": {"num_stories": 400, "num_problems": 400}, "seq_len": 64}
    raw["data"] |= {"vocab_size": 320, "seqs_per_shard": 64}
    raw["model"] |= {"hidden_size": hidden_size, "num_layers": num_layers, "num_heads": 8}
    raw["model"] |= {"num_kv_heads": 8, "intermediate_size": hidden_size * 8 // 3}
    raw["model"]["max_position_embeddings"] = 128
    raw["compute"] |= {"nproc_per_node": 1, "launcher": "python"}
    stage = {"global_batch_size": 8, "micro_batch_size": 8, "warmup_steps": 1, "seq_len": 64}
    raw["pretrain"] |= stage | {"num_steps": 4, "checkpoint_every": 1}
    raw["sft"] |= stage | {"num_steps": 2, "checkpoint_every": 1, "seq_len": 96}
    for name in ("distill", "grpo"):
        raw[name] |= {"seq_len": 96}
    raw["eval"] = {"max_examples": 4, "max_new_tokens": 4, "num_samples": 1}
    return validate_params(raw, source="bench")


def _workspace(project: Path, params: PipelineParams) -> None:
    from openrelease.data.stage import run_data_stage
    from openrelease.eval.stage import run_eval_stage
    from openrelease.train import run_stage

    (project / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    run_data_stage(params, project_dir=project)
    for stage in ("pretrain", "sft"):
        run_stage(stage, params, project_dir=project)
    run_eval_stage(params, project_dir=project)


def _timed_build(
    project: Path, out: Path, *, link: bool, states: bool = True
) -> tuple[float, BundleReport]:
    params = load_params(project / "params.yaml")
    if not states:  # no training states: nothing in the bundle lacks a recorded sha256
        release = params.release.model_copy(update={"retention": RetentionParams(keep_last=False)})
        params = params.model_copy(update={"release": release})
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = build_bundle(project, out, params=params, link=link)
    return time.perf_counter() - start, report


def _timed_cp(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    hashed_checkpoint_bytes = 0
    real_hash_files = bundle_mod.hash_files

    def spy(root: Path, sizes: dict[str, int], **kw: Any) -> tuple[dict[str, str], dict[str, str]]:
        nonlocal hashed_checkpoint_bytes
        hashed_checkpoint_bytes += sum(n for p, n in sizes.items() if "/checkpoints/" in p)
        return real_hash_files(root, sizes, **kw)

    bundle_mod.hash_files = spy  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as tmp:
        project, out = Path(tmp) / "project", Path(tmp) / "release"
        project.mkdir()
        started = time.perf_counter()
        _workspace(project, _params(args.hidden_size, args.num_layers))
        train_s = time.perf_counter() - started
        linked, copied, cp_r, no_states = [], [], [], []
        for _ in range(args.repeats):
            seconds, link_report = _timed_build(project, out, link=True)
            linked.append(seconds)
            cp_r.append(_timed_cp(out, Path(tmp) / "cp-r"))
            seconds, copy_report = _timed_build(project, out, link=False)
            copied.append(seconds)
            no_states.append(_timed_build(project, out, link=True, states=False)[0])
    assert link_report.bundle_digest == copy_report.bundle_digest
    print(
        json.dumps(
            {
                "bench": "bundle",
                "cores": len(os.sched_getaffinity(0)),
                "workspace_train_s": round(train_s, 1),
                "num_files": link_report.num_files,
                "total_mb": round(link_report.num_bytes / 1e6, 1),
                "num_linked": link_report.num_linked,
                "build_link_s": round(min(linked), 3),
                "build_copy_s": round(min(copied), 3),
                "cp_r_s": round(min(cp_r), 3),
                "link_vs_copy": round(min(linked) / min(copied), 3),
                "link_vs_cp_r": round(min(linked) / min(cp_r), 3),
                "build_link_no_states_s": round(min(no_states), 3),
                "no_states_vs_cp_r": round(min(no_states) / min(cp_r), 3),
                "bytes_hashed_mb": round(link_report.bytes_hashed / 1e6, 2),
                "checkpoint_bytes_rehashed": hashed_checkpoint_bytes,
                "goal": "checkpoint_bytes_rehashed == 0 and no_states_vs_cp_r < 1",
            }
        )
    )


if __name__ == "__main__":
    main()
