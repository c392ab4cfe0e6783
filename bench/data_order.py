"""Benchmark the data order at 10^9 samples: `data batch` and `data where --doc` latency, memory.

The order (openrelease/data/order.py) is what scales with the number of samples: the batch of a
step is ``global_batch`` (O(batch size)), the steps that saw a sample are ``steps_of`` (one
inverse permutation per epoch). Decoding the samples' tokens is a read of one row each and does
not depend on n. Goals: <= 10 ms per call, <= 100 MB of memory.

Run: python bench/data_order.py [--num-samples N] [--batch B] [--calls K]; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import time
import tracemalloc

from openrelease.data.order import ORDER_ALGORITHM, global_batch, steps_of


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    """Time `global_batch` and `steps_of` on random steps and samples; print one JSON line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-samples", type=int, default=10**9)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=3, help="the run spans this many epochs")
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    n, gbs = args.num_samples, args.batch
    num_steps = args.epochs * n // gbs
    kw = {"seed": 1234, "data_digest": "sha256:" + "ab" * 32, "stage": "pretrain"}
    rng = random.Random(0)
    global_batch(step=1, num_samples=n, global_batch_size=gbs, **kw)  # import and warm numpy
    rss_before = _rss_mb()
    tracemalloc.start()
    batch_ms, where_ms = [], []
    for _ in range(args.calls):
        step = rng.randrange(1, num_steps + 1)
        t0 = time.perf_counter()
        batch = global_batch(step=step, num_samples=n, global_batch_size=gbs, **kw)
        batch_ms.append((time.perf_counter() - t0) * 1e3)
        index = batch[rng.randrange(gbs)]
        t0 = time.perf_counter()
        steps = steps_of(index, num_samples=n, global_batch_size=gbs, num_steps=num_steps, **kw)
        where_ms.append((time.perf_counter() - t0) * 1e3)
        assert step in steps, "the inverse finds the step the sample came from"
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    result = {
        "bench": "data_order",
        "algorithm": ORDER_ALGORITHM,
        "num_samples": n,
        "global_batch_size": gbs,
        "epochs": args.epochs,
        "calls": args.calls,
        "batch_ms_median": round(statistics.median(batch_ms), 3),
        "batch_ms_p99": round(sorted(batch_ms)[int(0.99 * len(batch_ms)) - 1], 3),
        "where_ms_median": round(statistics.median(where_ms), 3),
        "where_ms_p99": round(sorted(where_ms)[int(0.99 * len(where_ms)) - 1], 3),
        "traced_peak_mb": round(peak / 2**20, 3),
        "rss_peak_mb": round(_rss_mb(), 1),
        "rss_growth_mb": round(_rss_mb() - rss_before, 1),
        "goal_ms": 10,
        "goal_mb": 100,
    }
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
