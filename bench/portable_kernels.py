"""Portable vs native CPU kernels on the tiny pretrain: wall ratio and whether the bytes differ.

    python bench/portable_kernels.py --out bench/results/portable_kernels-<machine>.json

Builds the tiny recipe's data in a temporary workspace, then trains pretrain to its first
checkpoint (2 gloo ranks, as `dvc repro` does) alternately with ``compute.deterministic:
portable`` (the pins of train/launch.py: ATen AVX2, MKL_CBWR=COMPATIBLE, oneDNN AVX2) and
``true`` (the machine's native kernels, with the pins removed from the environment),
``--repeats`` times each. Prints one JSON line: the median wall time of each, ``wall_ratio`` =
portable / native, the weights sha256 of each (``same_bytes``: whether the pins changed the
result on this machine) and the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from openrelease.data.stage import build_data
from openrelease.layout import CHECKPOINT_META, WEIGHTS, Workspace
from openrelease.manifest import CheckpointMeta, read_model
from openrelease.params import PipelineParams, load_params
from openrelease.record.fingerprint import cpu_fingerprint
from openrelease.reproduce.replay import run_replay
from openrelease.train.launch import PORTABLE_CPU_ENV

RECIPE = Path(__file__).resolve().parent.parent / "pipelines" / "tiny.yaml"


def _train(data: Path, params: PipelineParams, steps: int) -> tuple[float, str, str]:
    """Pretrain to ``steps`` in a fresh workspace linking ``data``: seconds, sha256, capability."""
    with tempfile.TemporaryDirectory(prefix="openrelease-bench-") as tmp:
        root = Path(tmp)
        (root / "artifacts").mkdir()
        (root / "artifacts" / "data").symlink_to(data, target_is_directory=True)
        (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
        started = time.perf_counter()
        world = params.compute.nproc_per_node
        replayed = run_replay(root, "pretrain", params, stop_at_step=steps, world_size=world)
        seconds = time.perf_counter() - started
        meta = read_model(
            Workspace(root).checkpoint("pretrain", steps) / CHECKPOINT_META, CheckpointMeta
        )
        sha = next(f.sha256 for f in meta.files if f.path == WEIGHTS)
        return seconds, sha, replayed.fingerprint.get("torch.cpu_capability", "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=0, help="default: the first checkpoint")
    parser.add_argument("--out", type=Path, help="also write the JSON line here")
    args = parser.parse_args()
    portable = load_params(RECIPE)
    if portable.compute.determinism != "portable":
        raise SystemExit(f"{RECIPE} is not in portable mode")
    native = portable.model_copy(
        update={"compute": portable.compute.model_copy(update={"deterministic": True})}
    )
    steps = args.steps or portable.pretrain.checkpoint_every
    for name in PORTABLE_CPU_ENV:  # native: whatever the machine picks
        os.environ.pop(name, None)
    with tempfile.TemporaryDirectory(prefix="openrelease-bench-data-") as tmp:
        build_data(portable.data, seed=portable.seed, project_dir=Path(tmp))
        data = Path(tmp) / "artifacts" / "data"
        runs: dict[str, list[tuple[float, str, str]]] = {"portable": [], "native": []}
        for _ in range(args.repeats):  # alternate, so load from other processes hits both
            runs["portable"].append(_train(data, portable, steps))
            runs["native"].append(_train(data, native, steps))
    secs = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    shas = {k: sorted({r[1] for r in v}) for k, v in runs.items()}
    cpu = cpu_fingerprint()
    line = json.dumps(
        {
            "bench": "portable_kernels",
            "machine": cpu["cpu.model"],
            "cpu_isa": cpu["cpu.isa"],
            "cores": cpu["cpu.count"],
            "recipe": "pipelines/tiny.yaml pretrain, 2 gloo ranks, 1 thread each",
            "steps": steps,
            "repeats": args.repeats,
            "portable_s": round(secs["portable"], 2),
            "native_s": round(secs["native"], 2),
            "wall_ratio": round(secs["portable"] / secs["native"], 3),
            "portable_capability": runs["portable"][0][2],
            "native_capability": runs["native"][0][2],
            "portable_sha256": shas["portable"],
            "native_sha256": shas["native"],
            "same_bytes": shas["portable"] == shas["native"],
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
        }
    )
    print(line)
    if args.out:
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
