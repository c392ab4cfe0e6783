"""Benchmark `verify_bundle` hashing against the ideal of cores x one-thread hashlib.sha256.

Run: python bench/verify.py [--num-files N] [--file-mb M]; prints one JSON line (goal ratio >= 0.8).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from openrelease.digest import sha256_file, sha256_tree
from openrelease.manifest import BundleManifest, FileEntry, write_json
from openrelease.verify.bundle import verify_bundle


def _make_bundle(bundle_dir: Path, *, num_files: int, file_mb: int) -> list[Path]:
    paths = []
    for i in range(num_files):
        path = bundle_dir / "data" / f"shard-{i:03d}.dat"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(file_mb << 20))
        paths.append(path)
    entries = [
        FileEntry(
            path=p.relative_to(bundle_dir).as_posix(), size=p.stat().st_size, sha256=sha256_file(p)
        )
        for p in paths
    ]
    manifest = BundleManifest(
        name="bench",
        created="2025-01-01T00:00:00Z",
        files=tuple(entries),
        bundle_digest=sha256_tree({e.path: e.sha256 for e in entries}),
    )
    write_json(bundle_dir / "MANIFEST.json", manifest)
    return paths


def _single_thread(paths: list[Path]) -> float:
    """Seconds for plain hashlib.sha256 over every file, one thread, 1 MiB reads."""
    start = time.perf_counter()
    for path in paths:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.hexdigest()
    return time.perf_counter() - start


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-files", type=int, default=4 * cores)
    parser.add_argument("--file-mb", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir = Path(tmp) / "release"
        paths = _make_bundle(bundle_dir, num_files=args.num_files, file_mb=args.file_mb)
        total = sum(p.stat().st_size for p in paths)
        single = min(_single_thread(paths) for _ in range(args.repeats))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            report = verify_bundle(bundle_dir)
            times.append(time.perf_counter() - start)
        if report.num_bytes != total or report.changed or report.missing:
            raise SystemExit(f"verify did not hash the bench files cleanly: {report.problems}")
    single_mbs = total / single / 1e6
    verify_mbs = total / min(times) / 1e6
    print(
        json.dumps(
            {
                "bench": "verify",
                "cores": cores,
                "num_files": args.num_files,
                "total_mb": round(total / 1e6, 1),
                "single_thread_mb_s": round(single_mbs, 1),
                "ideal_mb_s": round(cores * single_mbs, 1),
                "verify_mb_s": round(verify_mbs, 1),
                "ratio": round(verify_mbs / (cores * single_mbs), 3),
                "goal": 0.8,
            }
        )
    )


if __name__ == "__main__":
    main()
