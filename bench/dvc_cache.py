"""DVC caching cost: the tiny pretrain under `dvc repro` with its checkpoints cached vs not.

One project is made with `openrelease init` (the tiny recipe, optionally fewer steps) and its
data stage run once; every measured run starts from a copy of it. "cached" is `dvc repro
pretrain` (checkpoints, states and metrics go into the DVC cache and are linked back);
"uncached" is `dvc repro --no-commit pretrain` (same stage, same hashing for dvc.lock, nothing
put in the cache); "cached_reflink_first" is "cached" with DVC's usual link order
(reflink,hardlink,...), which on a filesystem without reflinks copies every byte into the cache.
Runs rotate through the modes.

Each `dvc` runs in its own process, which reports the bytes it read itself (/proc/self/io rchar:
DVC's hashing, not the training processes it starts), so the JSON also says whether DVC
re-reads the checkpoint bytes the trainer already hashed (sha256 in meta.json): DVC hashes with
md5 and cannot reuse them.

Run: python bench/dvc_cache.py [--steps 200] [--repeats 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from openrelease.params import load_params
from openrelease.pipeline import init_project, sync_pipeline

BIN = Path(sys.executable).parent
RUN_DVC = (
    "import json, sys\n"
    "from dvc.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "io = dict(line.split(': ') for line in open('/proc/self/io').read().splitlines())\n"
    "print('@@' + json.dumps({'code': code, 'rchar': int(io['rchar'])}))\n"
)


def _machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln), "?"
        )
    except OSError:
        model = platform.processor() or "?"
    return f"{model}; {os.cpu_count()} cores; Python {platform.python_version()}"


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@localhost",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@localhost",
    }


def _dvc(args: list[str], cwd: Path) -> tuple[float, int]:
    """Run ``dvc args`` in a fresh process; return (wall seconds, bytes that process read)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", RUN_DVC, *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@")), None)
    if proc.returncode != 0 or line is None or json.loads(line[2:])["code"] != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr}")
    return wall, int(json.loads(line[2:])["rchar"])


def _template(root: Path, steps: int) -> Path:
    project = root / "template"
    init_project(project, "tiny")
    raw = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    raw["pretrain"]["num_steps"] = steps
    raw["pretrain"]["checkpoint_every"] = max(1, min(raw["pretrain"]["checkpoint_every"], steps))
    raw["pretrain"]["warmup_steps"] = min(raw["pretrain"]["warmup_steps"], steps - 1)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    sync_pipeline(project, load_params(project / "params.yaml"))
    for args in (["add", "-A"], ["commit", "-qm", "bench"]):
        subprocess.run(["git", *args], cwd=project, env=_env(), check=True)
    _dvc(["repro", "data"], project)
    return project


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _disk_bytes(folder: Path) -> int:
    """Bytes of cache files not shared (hard-linked) with the workspace."""
    return sum(
        p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.stat().st_nlink == 1
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    modes = ["cached", "uncached", "cached_reflink_first"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    reads: dict[str, list[int]] = {m: [] for m in modes}
    written = 0
    cache_bytes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="dvc-cache-bench-") as tmp:
        template = _template(Path(tmp), args.steps)
        for i in range(args.repeats):
            for mode in modes[i % 3 :] + modes[: i % 3]:
                work = Path(tmp) / f"{mode}-{i}"
                shutil.copytree(template, work, symlinks=True)
                repro = ["repro", "--no-commit"] if mode == "uncached" else ["repro"]
                if mode == "cached_reflink_first":
                    config = work / ".dvc/config"
                    text = config.read_text().replace("hardlink,reflink", "reflink,hardlink")
                    config.write_text(text)
                before = _disk_bytes(work / ".dvc/cache")
                wall, rchar = _dvc([*repro, "pretrain"], work)
                times[mode].append(wall)
                reads[mode].append(rchar)
                stage = work / "artifacts/pretrain"
                written = _bytes(stage / "checkpoints") + _bytes(stage / "states")
                cache_bytes[mode] = _disk_bytes(work / ".dvc/cache") - before
                shutil.rmtree(work)
    cached, uncached = statistics.median(times["cached"]), statistics.median(times["uncached"])
    reflink_first = statistics.median(times["cached_reflink_first"])
    read_cached = statistics.median(reads["cached"])
    result = {
        "bench": "dvc_cache",
        "steps": args.steps,
        "repeats": args.repeats,
        "cached_s": round(cached, 2),
        "uncached_s": round(uncached, 2),
        "ratio": round(cached / uncached, 3),
        "cached_reflink_first_s": round(reflink_first, 2),
        "ratio_reflink_first": round(reflink_first / uncached, 3),
        "goal": 1.05,
        "runs_s": {k: [round(v, 2) for v in vs] for k, vs in times.items()},
        "checkpoint_and_state_bytes": written,
        "dvc_read_bytes_cached": int(read_cached),
        "dvc_read_bytes_uncached": int(statistics.median(reads["uncached"])),
        "dvc_rereads_checkpoint_bytes": read_cached >= written,
        "extra_disk_bytes_for_the_cache": cache_bytes,
        "machine": _machine(),
    }
    line = json.dumps(result, sort_keys=True)
    print(line)
    if args.out is not None:
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
