"""PortableAdamW vs torch's AdamW: optimizer step time on the tiny recipe's model, one thread.

    python bench/adamw.py --out bench/results/adamw-<machine>.json

Builds the tiny recipe's Llama (pipelines/tiny.yaml's model section, 512-token vocabulary),
gives it fixed random gradients and times ``--steps`` optimizer steps of each optimizer,
alternating, ``--repeats`` times. Prints one JSON line: the median seconds per step of
``torch.optim.AdamW`` (single-tensor and foreach) and of ``PortableAdamW`` (train/adamw.py, what
CPU training uses), ``step_ratio`` = portable / torch single-tensor, and the CPU model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from openrelease.params import load_params
from openrelease.record.fingerprint import cpu_fingerprint
from openrelease.train.adamw import PortableAdamW
from openrelease.train.model import build_model

RECIPE = Path(__file__).resolve().parent.parent / "pipelines" / "tiny.yaml"
HYPER = {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}


def _optimizers() -> dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]]:
    return {
        "torch_single_tensor": lambda ps: torch.optim.AdamW(ps, **HYPER, foreach=False),
        "torch_foreach": lambda ps: torch.optim.AdamW(ps, **HYPER, foreach=True),
        "portable": lambda ps: PortableAdamW(ps, **HYPER),
    }


def _time(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(load_params(RECIPE).model, vocab_size=512)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = make(params)
    opt.step()  # state allocated outside the timing
    started = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the JSON line here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {name: [] for name in _optimizers()}
    for _ in range(args.repeats):
        for name, make in _optimizers().items():
            times[name].append(_time(make, args.steps))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    line = json.dumps(
        {
            "bench": "adamw",
            "machine": cpu_fingerprint()["cpu.model"],
            "params": sum(
                p.numel()
                for p in build_model(load_params(RECIPE).model, vocab_size=512).parameters()
            ),
            "seconds_per_step": {k: round(v, 6) for k, v in median.items()},
            "step_ratio": round(median["portable"] / median["torch_single_tensor"], 3),
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
        }
    )
    print(line)
    if args.out:
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
