"""Benchmark `openrelease audit`: a bundle folder and the same release on a loopback Hub.

Run: python bench/audit.py [--num-checkpoints N] [--repeats R]; prints one JSON line.
Times exclude hashing (the folder audit runs with check_hashes=False; the Hub gives LFS sha256s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from huggingface_hub import CommitOperationAdd, HfApi, constants
from safetensors.numpy import save_file

from openrelease.audit.mof import mof_components, mof_release_yaml
from openrelease.digest import sha256_bytes, sha256_file, sha256_tree
from openrelease.manifest import BundleManifest, CheckpointMeta, FileEntry, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hubserver import TOKEN, USER, serve_hub

REPO = f"{USER}/bench-release"
TEXTS = {
    "README.md": "---\nlicense: apache-2.0\n---\n# bench\n",
    "LICENSES/Apache-2.0.txt": "Apache License\nVersion 2.0, January 2004\n",
    "code/openrelease/train/model.py": "class Model: ...\n",
    "code/openrelease/data/stage.py": "def prepare(): ...\n",
    "code/openrelease/train/loop.py": "def train(): ...\n",
    "code/openrelease/eval/stage.py": "def evaluate(): ...\n",
    "sbom/bom.cdx.json": '{"bomFormat": "CycloneDX"}\n',
    "data/croissant.json": '{"@type": "sc:Dataset", "license": "Apache-2.0"}\n',
    "data/eval_problems.jsonl": '{"q": "1+1"}\n',
    "data/pretrain_docs.jsonl": '{"text": "hi"}\n',
    "evals/results/final.json": '{"loss": 1.0}\n',
    "evals/samples/final.jsonl": '{"output": "2"}\n',
    "docs/technical_report.md": "# Report\n",
    "docs/research_paper.md": "# Paper\n",
    "configs/params.yaml": "seed: 0\n",
}
PATHS = {"Inference code": "code/openrelease/eval/stage.py"}


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layer.{i}.weight": rng.standard_normal((64, 64), dtype=np.float32) for i in range(8)}


def _entries(folder: Path) -> list[FileEntry]:
    return [
        FileEntry(
            path=p.relative_to(folder).as_posix(), size=p.stat().st_size, sha256=sha256_file(p)
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]


def _write_meta(ckpt: Path, *, step: int) -> None:
    files = tuple(_entries(ckpt))
    digest = sha256_bytes(str(step).encode())
    meta = CheckpointMeta(
        stage="pretrain",
        step=step,
        tokens_seen=step * 64,
        samples_seen=step,
        sample_range=(step - 1, step),
        data_digest=digest,
        loss=1.0,
        params_digest=digest,
        parent_digest=None,
        files=files,
        checkpoint_digest=sha256_tree({f.path: f.sha256 for f in files}),
    )
    write_json(ckpt / "meta.json", meta)


def make_release(bundle: Path, *, num_checkpoints: int) -> None:
    for rel, text in TEXTS.items():
        (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
        (bundle / rel).write_text(text)
    (bundle / "model").mkdir()
    write_json(bundle / "model" / "config.json", {"model_type": "llama"})
    save_file(_weights(0), str(bundle / "model" / "model.safetensors"))
    for step in range(1, num_checkpoints + 1):
        ckpt = bundle / "checkpoints" / "pretrain" / f"step-{step}"
        ckpt.mkdir(parents=True)
        save_file(_weights(step), str(ckpt / "model.safetensors"))
        write_json(ckpt / "config.json", {"model_type": "llama"})
        _write_meta(ckpt, step=step)
    comps = {c.name: "Apache-2.0" for c in mof_components()}
    (bundle / "mof.yaml").write_text(
        mof_release_yaml(name="bench", version="1", producer="bench", components=comps, paths=PATHS)
    )
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    entries = [
        FileEntry(
            path=p.relative_to(bundle).as_posix(), size=p.stat().st_size, sha256=sha256_file(p)
        )
        for p in files
    ]
    tree = sha256_tree({e.path: e.sha256 for e in entries})
    manifest = BundleManifest(name="bench", created="2025-01-01T00:00:00Z", files=tuple(entries),
                              bundle_digest=tree)  # fmt: skip
    write_json(bundle / "MANIFEST.json", manifest)


def publish(api: HfApi, bundle: Path) -> None:
    api.create_repo(REPO, exist_ok=True)
    root = api.list_repo_commits(REPO)[-1].commit_id
    main = [p for p in sorted(bundle.rglob("*")) if p.is_file() and "checkpoints" not in p.parts]
    ops = [CommitOperationAdd(p.relative_to(bundle).as_posix(), p.read_bytes()) for p in main]
    api.create_commit(REPO, operations=ops, commit_message="release")
    for ckpt in sorted((bundle / "checkpoints" / "pretrain").iterdir()):
        branch = f"pretrain-step{ckpt.name.removeprefix('step-')}"
        api.create_branch(REPO, branch=branch, revision=root)
        ops = [CommitOperationAdd(p.name, p.read_bytes()) for p in sorted(ckpt.iterdir())]
        api.create_commit(REPO, operations=ops, commit_message=branch, revision=branch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-checkpoints", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    constants.HF_HUB_DISABLE_XET = True
    constants.HF_HUB_DISABLE_TELEMETRY = True
    from openrelease.audit.report import audit_folder, audit_hub_repo

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_HOME"] = str(Path(tmp) / "hf_home")
        bundle = Path(tmp) / "release"
        make_release(bundle, num_checkpoints=args.num_checkpoints)
        num_files = sum(1 for p in bundle.rglob("*") if p.is_file())
        folder_times, hub_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            folder = audit_folder(bundle, check_hashes=False)
            folder_times.append(time.perf_counter() - start)
        with serve_hub(Path(tmp) / "hub") as hub:
            publish(HfApi(endpoint=hub.endpoint, token=TOKEN), bundle)
            before = len(hub.log)
            for _ in range(args.repeats):
                start = time.perf_counter()
                remote = audit_hub_repo(REPO, endpoint=hub.endpoint, token=TOKEN)
                hub_times.append(time.perf_counter() - start)
            requests = (len(hub.log) - before) // args.repeats
            downloaded = hub.lfs_bytes_downloaded
        if folder.mof_class != 1 or remote.mof_class != 1:
            raise SystemExit(f"bench release is not Class I: {folder.problems} {remote.problems}")
    result = {
        "bench": "audit",
        "num_checkpoints": args.num_checkpoints,
        "num_files": num_files,
        "folder_s": round(min(folder_times), 4),
        "hub_s": round(min(hub_times), 4),
        "hub_requests_per_audit": requests,
        "hub_lfs_bytes_downloaded": downloaded,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
