"""Regenerate tests/golden/tiny.json: the tiny recipe's checkpoint digests and eval numbers.

    .venv/bin/python tests/golden/regenerate.py           # whole pipeline (~10 min on 2 cores)
    .venv/bin/python tests/golden/regenerate.py --check   # the same; exit 1 if anything moved
    .venv/bin/python tests/golden/regenerate.py --segment # only what tests/test_golden.py replays
    .venv/bin/python tests/golden/regenerate.py --check --confirm  # unchanged: add this CPU

It runs pipelines/tiny.yaml (``compute.deterministic: portable``) in a temporary workspace with
the real commands (`openrelease data`, `openrelease launch <stage>` for every training stage,
`openrelease eval`), then writes ``{"checkpoints": {"<stage>/step-<N>": "sha256:..."}, "eval":
{"<stage>": {"<metric>": value}}}`` (checkpoint: the sha256 of its model.safetensors; eval: the
metrics of each stage's final checkpoint; ``kernels``: tests/golden/kernel_digests.py, the digests
of the CPU kernels training relies on) and prints every key that changed. ``confirmed_on``
lists the CPUs that gave these digests (vendor, model, family/model number, ISA flags, date):
writing new digests resets it to this machine; ``--check --confirm`` adds this machine when
nothing moved. tests/test_golden.py replays in every `make test` on a vendor listed there.

Digests change, on purpose, when the recipe, the data, the data order or the training code
change: rerun this, commit tests/golden/tiny.json, and update the README's "Golden digests"
section (the eval numbers and the CPU models that confirmed them). A digest that changes with
nothing else changed is a portability bug: report the machine (``lscpu | grep 'Model name'``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
GOLDEN = Path(__file__).resolve().parent / "tiny.json"
RECIPE = REPO / "pipelines" / "tiny.yaml"
sys.path.insert(0, str(REPO))

from openrelease.layout import WEIGHTS, Workspace  # noqa: E402
from openrelease.manifest import EvalResult, StageManifest, read_model  # noqa: E402
from openrelease.params import load_params  # noqa: E402
from openrelease.record.fingerprint import cpu_fingerprint  # noqa: E402

CONFIRMED = "confirmed_on"
"""tiny.json's list of the CPUs that gave its digests; not a digest, so not compared."""


def this_machine() -> dict[str, str]:
    """This CPU as tiny.json's ``confirmed_on`` records it."""
    cpu = cpu_fingerprint()
    keys = ("cpu.vendor", "cpu.model", "cpu.family", "cpu.isa")
    entry = {k.removeprefix("cpu."): cpu.get(k, "?") for k in keys}
    return {**entry, "date": time.strftime("%Y-%m-%d", time.gmtime())}


def say(line: str, *, err: bool = False) -> None:
    """This script's output (a script, not the cli/ layer: no print())."""
    stream = sys.stderr if err else sys.stdout
    stream.write(line + "\n")
    stream.flush()


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    say("$ openrelease " + " ".join(args), err=True)
    cmd = [sys.executable, "-m", "openrelease", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"openrelease {' '.join(args)} failed:\n{(done.stdout + done.stderr)[-3000:]}")


def weights_digests(root: Path, stages: tuple[str, ...]) -> dict[str, str]:
    """``<stage>/step-<N>`` -> the sha256 of that checkpoint's model.safetensors."""
    out = {}
    for stage in stages:
        manifest = read_model(Workspace(root).stage_manifest(stage), StageManifest)
        for meta in manifest.checkpoints:
            out[f"{stage}/step-{meta.step}"] = next(
                f.sha256 for f in meta.files if f.path == WEIGHTS
            )
    return out


def final_eval(root: Path) -> dict[str, dict[str, float]]:
    """Each stage's final checkpoint's metrics (rounded to 6 digits)."""
    results = [read_model(p, EvalResult) for p in Workspace(root).eval_results.rglob("*.json")]
    final: dict[str, EvalResult] = {}
    for r in sorted(results, key=lambda r: r.step):
        final[r.stage] = r
    return {s: {k: round(v, 6) for k, v in sorted(r.metrics.items())} for s, r in final.items()}


def segment(root: Path) -> dict[str, str]:
    """Pretrain to its first checkpoint with the replay worker (what tests/test_golden.py runs)."""
    from openrelease.data.stage import build_data
    from openrelease.reproduce.replay import run_replay

    params = load_params(root / "params.yaml")
    build_data(params.data, seed=params.seed, project_dir=root)
    first = params.pretrain.checkpoint_every
    world = params.compute.nproc_per_node * params.compute.nnodes
    run_replay(root, "pretrain", params, stop_at_step=first, world_size=world)
    return weights_digests(root, ("pretrain",))


def kernel_digests(params_path: Path) -> dict[str, str]:
    """tests/golden/kernel_digests.py in a fresh interpreter under the recipe's pins."""
    from kernel_digests import under_pins  # this script's folder is sys.path[0]

    try:
        return under_pins(params_path)
    except RuntimeError as exc:
        sys.exit(str(exc))


def pipeline(root: Path) -> dict[str, Any]:
    """The whole tiny pipeline with the CLI; its checkpoint digests and final eval metrics."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    stages = load_params(root / "params.yaml").train_stages
    _run(["data"], root, env)
    for stage in stages:
        _run(["launch", stage], root, env)
    _run(["eval"], root, env)
    return {
        "checkpoints": weights_digests(root, stages),
        "eval": final_eval(root),
        "kernels": kernel_digests(root / "params.yaml"),
    }


def changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """One line per key added, removed or changed between two golden files."""
    lines = []
    for key in sorted((set(old) | set(new)) - {CONFIRMED}):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += changes(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(
                f"{prefix}{key}: {a if a is not None else '-'} -> {b if b is not None else '-'}"
            )
    return lines


def _write(golden: dict[str, Any]) -> None:
    tmp = GOLDEN.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(golden, indent=2, sort_keys=True) + "\n")
    tmp.replace(GOLDEN)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 on a change")
    parser.add_argument("--segment", action="store_true", help="only pretrain's first checkpoint")
    parser.add_argument(
        "--confirm", action="store_true", help="with --check: nothing moved, add this CPU"
    )
    args = parser.parse_args(argv)
    old: dict[str, Any] = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="openrelease-golden-") as tmp:
        root = Path(tmp)
        (root / "params.yaml").write_bytes(RECIPE.read_bytes())
        if args.segment:
            new = {
                **old,
                "checkpoints": {**old.get("checkpoints", {}), **segment(root)},
                "kernels": kernel_digests(root / "params.yaml"),
            }
        else:
            new = pipeline(root)
    moved = changes(old, new)
    for line in moved:
        say(line)
    if not moved:
        say(f"{GOLDEN.relative_to(REPO)}: unchanged")
        if args.confirm and not args.segment:
            _write({**old, CONFIRMED: [*old.get(CONFIRMED, []), this_machine()]})
            say(f"added this CPU to {CONFIRMED}; add it to the README's 'Confirmed on' list")
        return 0
    if args.check:
        return 1
    _write({**new, CONFIRMED: [this_machine()]})
    say(f"wrote {GOLDEN.relative_to(REPO)}; update README 'Golden digests' (eval numbers, CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
