"""Which kernel-ISA settings change the bits: the table behind compute.deterministic: portable.

    python bench/kernel_pins.py --out bench/results/kernel_pins-<machine>.json

Trains the tiny recipe's Llama (random tokens, AdamW, grad clip, deterministic algorithms, one
process) for ``--steps`` steps in a fresh interpreter per environment (ATen, MKL and oneDNN
read their settings when torch starts) and prints one JSON line: per environment the kernel ISA
ATen dispatched to, the sha256 of the weights (first 16 hex digits) and the wall time; plus
``groups``, the environments that gave the same bytes. ``--optimizer portable`` (the default)
steps with the trainer's CPU AdamW (train/adamw.py); ``--optimizer torch`` with
``torch.optim.AdamW``, whose MKL sqrt gives other bits on Intel and AMD (the table in the README
until 2026-12-04 was made that way).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from openrelease.record.fingerprint import cpu_fingerprint
from openrelease.train.launch import PORTABLE_CPU_ENV

ENVS = {
    "native": {},
    "aten_avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten_avx2+mkl_cbwr_avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"},
    "portable (the pins)": dict(PORTABLE_CPU_ENV),
    "aten_avx2+mkl_cbwr_avx2+onednn_avx2 (the pins until 2026-12-03)": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_CBWR": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
    "aten_avx2+mkl_cbwr_avx2_strict": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"},
    "aten_avx2+mkl_cbwr_compatible": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"},
    "aten_avx2+onednn_avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "mkl_cbwr_avx2": {"MKL_CBWR": "AVX2"},
    "onednn_avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "aten_default": {"ATEN_CPU_CAPABILITY": "default"},
}
PINS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")

CHILD = """
import hashlib, json, sys, time
import torch
from openrelease.params import ModelParams
from openrelease.train.adamw import PortableAdamW
from openrelease.train.model import build_model
steps, optimizer = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
shape = ModelParams(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4,
                    intermediate_size=344, max_position_embeddings=256)
model = build_model(shape, vocab_size=512)
if optimizer == "torch":
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
else:
    opt = PortableAdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.999), weight_decay=0.1)
gen = torch.Generator().manual_seed(1)
started = time.perf_counter()
for _ in range(steps):
    x = torch.randint(0, 512, (4, 256), generator=gen)
    model(input_ids=x, labels=x).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
h = hashlib.sha256()
for _, v in sorted(model.state_dict().items()):
    h.update(v.detach().contiguous().numpy().tobytes())
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                  "sha256": h.hexdigest()[:16], "s": round(time.perf_counter() - started, 2)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--optimizer", choices=["portable", "torch"], default="portable")
    parser.add_argument("--out", type=Path, help="also write the JSON line here")
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in PINS}
    base["OMP_NUM_THREADS"] = "1"
    results = {}
    for name, extra in ENVS.items():
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.steps), args.optimizer],
            env={**base, **extra},
            capture_output=True,
            text=True,
            check=True,
        )
        results[name] = {"env": extra, **json.loads(done.stdout.strip().splitlines()[-1])}
    groups: dict[str, list[str]] = {}
    for name, r in results.items():
        groups.setdefault(r["sha256"], []).append(name)
    cpu = cpu_fingerprint()
    line = json.dumps(
        {
            "bench": "kernel_pins",
            "machine": cpu["cpu.model"],
            "cpu_isa": cpu["cpu.isa"],
            "steps": args.steps,
            "optimizer": args.optimizer,
            "results": results,
            "groups": list(groups.values()),
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
        }
    )
    print(line)
    if args.out:
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
