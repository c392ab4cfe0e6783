"""Training throughput: our FSDP2 trainer vs a plain LlamaForCausalLM + AdamW loop.

GPU (the issue's setting, ~1B Llama, seq 2048, bf16, one GPU):
    python bench/train_throughput.py --out bench/results/h100.json
CPU smoke test (tiny model, seconds, no MFU):
    python bench/train_throughput.py --smoke
Prints one JSON line: tokens/s of each loop, our ratio to the plain loops, and MFU
(flops_per_token = 6N + causal attention, vs the GPU's dense bf16 peak).

The cost of determinism (issue 20: the recorded cost of ``compute.deterministic`` on GPU):
    python bench/train_throughput.py --determinism [--smoke]
runs our trainer once per ``compute.deterministic`` setting (false, true; portable too on CPU),
each in a fresh process started with `openrelease.train.launch.launch_env` (the cuBLAS workspace
and CPU kernel pins must be set before torch's first op), and prints one JSON line: tokens/s of
each and the ratio of each to ``false``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from openrelease.params import ComputeParams, ModelParams, TrainStageParams
from openrelease.train import distributed
from openrelease.train.job import MicroBatch, TrainJob
from openrelease.train.loop import run_training
from openrelease.train.model import SpecialTokens, build_model, count_params, flops_per_token

BIG = ModelParams(
    hidden_size=2048,
    num_layers=16,
    num_heads=16,
    num_kv_heads=16,
    intermediate_size=5632,
    max_position_embeddings=2048,
)
TINY = ModelParams(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
)
# Dense bf16 peak FLOP/s (no sparsity) by device name fragment.
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


class RandomTokens:
    """Deterministic random token rows: the batch source for both loops."""

    def __init__(self, *, vocab_size: int, seq_len: int, num_samples: int = 4096) -> None:
        self.vocab_size, self.seq_len, self._n = vocab_size, seq_len, num_samples

    @property
    def num_samples(self) -> int:
        return self._n

    def micro_batches(self, indices: list[int], *, micro_batch_size: int) -> list[MicroBatch]:
        out = []
        for start in range(0, len(indices), micro_batch_size):
            g = torch.Generator().manual_seed(indices[start])
            ids = torch.randint(0, self.vocab_size, (micro_batch_size, self.seq_len), generator=g)
            out.append(MicroBatch(input_ids=ids, labels=ids, attention_mask=None))
        return out


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plain_loop(args: argparse.Namespace, mp: ModelParams, *, compiled: bool) -> float:
    """tokens/s of LlamaForCausalLM + AdamW (bf16 autocast on GPU), median of timed steps."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model: torch.nn.Module = build_model(mp, vocab_size=args.vocab_size)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_fn = torch.compile(model) if compiled else model
    src = RandomTokens(vocab_size=args.vocab_size, seq_len=args.seq_len)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    times = []
    for step in range(args.warmup + args.steps):
        indices = list(range(step * args.batch, (step + 1) * args.batch))
        batch = src.micro_batches(indices, micro_batch_size=args.batch)[0]
        ids = batch.input_ids.to(device)
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = step_fn(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    del model, opt, step_fn
    _free()
    return float(args.batch * args.seq_len / statistics.median(times))


def _compute(args: argparse.Namespace, deterministic: bool | str = False) -> ComputeParams:
    on_gpu = args.device == "cuda"
    return ComputeParams(
        launcher="python",
        device=args.device,
        precision="bf16" if on_gpu else "fp32",
        compile=on_gpu and not args.no_compile,
        activation_checkpointing=args.ac,
        deterministic=deterministic,
        num_threads=torch.get_num_threads(),
    )


def our_loop(args: argparse.Namespace, mp: ModelParams) -> float:
    """tokens/s of openrelease's trainer (FSDP2 world 1), median of its per-step metrics."""
    compute = _compute(args, args.deterministic)
    total = args.warmup + args.steps
    params = TrainStageParams(
        num_steps=total,
        global_batch_size=args.batch,
        micro_batch_size=args.batch,
        seq_len=args.seq_len,
        lr=1e-4,
        warmup_steps=0,
        checkpoint_every=total,
    )
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "tok").mkdir()
        job = TrainJob(
            stage="bench",
            params=params,
            model=mp,
            compute=compute,
            seed=0,
            project_dir=project,
            source=RandomTokens(vocab_size=args.vocab_size, seq_len=args.seq_len),
            data_digest="sha256:bench",
            tokenizer_dir=project / "tok",
            vocab_size=args.vocab_size,
            special=SpecialTokens(),
            params_digest="sha256:bench",
        )
        ctx = distributed.init_distributed(compute)
        try:
            run_training(job, ctx)
        finally:
            distributed.teardown()
        rows = [json.loads(x) for x in (project / "artifacts/bench/metrics.jsonl").open()]
    _free()
    return float(statistics.median(r["tokens_per_s"] for r in rows[args.warmup :]))


DETERMINISM: dict[str, bool | str] = {"false": False, "true": True, "portable": "portable"}
"""``compute.deterministic`` as params spell it, by its name in the output."""


def determinism_cost(args: argparse.Namespace) -> dict[str, object]:
    """Our trainer under each ``compute.deterministic`` setting, each in a fresh process."""
    from openrelease.train.launch import launch_env

    modes = ["false", "true"] + (["portable"] if args.device == "cpu" else [])
    tps: dict[str, float] = {}
    for mode in modes:
        argv = [sys.executable, __file__, "--ours-only", "--deterministic", mode]
        argv += [a for a in sys.argv[1:] if a not in ("--determinism",)]
        env = launch_env(_compute(args, DETERMINISM[mode]))
        out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
        tps[mode] = json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]
    return {
        "bench": "determinism_cost",
        "tokens_per_s": {m: round(v, 1) for m, v in tps.items()},
        "ratio_vs_false": {m: round(v / tps["false"], 4) for m, v in tps.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--determinism", action="store_true", help="the cost of determinism (above)")
    ap.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--deterministic", choices=sorted(DETERMINISM), default="false", help=argparse.SUPPRESS
    )
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--ac", action="store_true", help="activation checkpointing in our trainer")
    ap.add_argument("--no-compile", action="store_true", help="skip every torch.compile run")
    ap.add_argument("--out", type=Path, help="also write the JSON line to this file")
    args = ap.parse_args()
    args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    mp = BIG
    if args.smoke:
        mp, args.steps, args.warmup, args.batch = TINY, 3, 1, 4
        args.seq_len, args.vocab_size, args.no_compile = 64, 512, True
        if args.determinism or args.ours_only:  # a ratio of medians: more steps than a smoke
            args.steps, args.warmup = 30, 5
    args.deterministic = DETERMINISM[args.deterministic]
    if args.ours_only:  # one run of `determinism_cost`, in its own process
        print(json.dumps({"tokens_per_s": our_loop(args, mp)}))
        return
    fpt = flops_per_token(mp, vocab_size=args.vocab_size, seq_len=args.seq_len)
    peak = _peak(torch.device(args.device))

    def entry(tps: float | None) -> dict[str, float | None] | None:
        if tps is None:
            return None
        return {"tokens_per_s": round(tps, 1), "mfu": round(tps * fpt / peak, 4) if peak else None}

    if args.determinism:
        device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        run = {"device": device, "smoke": args.smoke, "torch": torch.__version__}
        run |= {"seq_len": args.seq_len, "batch": args.batch, "steps": args.steps}
        _emit({**determinism_cost(args), **run}, args.out)
        return
    eager = plain_loop(args, mp, compiled=False)
    compiled = None if args.no_compile else plain_loop(args, mp, compiled=True)
    ours = our_loop(args, mp)
    best_plain = compiled or eager
    with torch.device("meta"):
        num_params = count_params(build_model(mp, vocab_size=args.vocab_size))
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "smoke": args.smoke,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model_params": num_params,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "steps": args.steps,
        "flops_per_token": fpt,
        "peak_flops": peak,
        "ours": entry(ours),
        "plain_eager": entry(eager),
        "plain_compiled": entry(compiled),
        "ratio_vs_best_plain": round(ours / best_plain, 4),
    }
    _emit(result, args.out)


def _emit(result: dict[str, object], out: Path | None) -> None:
    """Print ``result`` as one JSON line (and write it to ``out``)."""
    line = json.dumps(result, sort_keys=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
