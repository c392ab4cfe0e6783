"""Benchmark the data stage: tokenising throughput vs `tokenizers` encode_batch, and peak memory.

Throughput: the data stage's tokenise-and-pack path (`openrelease.data.pack.pack_documents`:
documents read from their JSONL, ``num_proc`` processes, shards written as it goes, worker
start-up included) against ``Tokenizer.encode_batch`` (Rust threads on every core, `REF_BATCH`
documents a call) on the same documents; the ratio is per core (goal >= 0.8). ``--docs`` sets
the corpus size: the workers' start-up weighs less as it grows.
Memory: peak RSS (VmHWM) of the main process of a whole `build_data` run at two corpus sizes
10x apart, each in a fresh process (goal: the same peak, under 2 GB). Tokenising workers hold
the tokenizer and one chunk of documents each.

Each throughput run is a fresh process, so each pays what one data stage pays once: the
tokenising workers' start (their fork server's included).

Run: python bench/data_stage.py [--docs N] [--num-proc P] [--repeats R]; prints one JSON line
(the throughput run of median ratio, and every run's ratio: on 2 shared cores one run varies by
about 5 %).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REF_BATCH = 10_000
"""Documents per ``encode_batch`` call of the reference (its encodings dropped after counting)."""

RSS_CHILD = """\
import sys
from pathlib import Path
from openrelease.data.stage import build_data
from openrelease.params import DataParams
params = DataParams.model_validate({
    "synthetic": {"num_stories": int(sys.argv[2]), "num_problems": 100},
    "vocab_size": 2048, "seq_len": 512, "seqs_per_shard": 256, "num_proc": int(sys.argv[3]),
})
build_data(params, seed=1, project_dir=Path(sys.argv[1]))
# VmHWM, not ru_maxrss: after fork+exec, ru_maxrss still counts the parent's forked image.
status = Path("/proc/self/status").read_text()
print(next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM")) / 1024)
"""


def _throughput(num_docs: int, num_proc: int) -> dict[str, float]:
    from openrelease.data import synthetic
    from openrelease.data.pack import pack_documents
    from openrelease.data.records import RecordWriter
    from openrelease.data.tokenizer import BOS, EOS, train_tokenizer

    texts = synthetic.generate_stories(1, num_docs)
    tokenizer = train_tokenizer(texts[:2000], vocab_size=2048)
    t0 = time.perf_counter()
    num_tokens = 0
    for start in range(0, len(texts), REF_BATCH):  # as one tokenises a corpus that outgrows RAM
        num_tokens += sum(
            len(e.ids) for e in tokenizer.encode_batch(texts[start : start + REF_BATCH])
        )
    ref_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs.jsonl"  # the stage packs from its documents' file
        with RecordWriter(docs) as out:
            for i, text in enumerate(texts):
                out.write({"id": f"doc-{i:07d}", "text": text, "source": "synthetic"})
        t0 = time.perf_counter()
        pack_documents(
            docs,
            tokenizer=tokenizer,
            bos_id=tokenizer.token_to_id(BOS),
            eos_id=tokenizer.token_to_id(EOS),  # type: ignore[arg-type]
            seq_len=512,
            seqs_per_shard=256,
            num_proc=num_proc,
            work_dir=Path(tmp) / "work",
        )
        ours_s = time.perf_counter() - t0
    cores = os.cpu_count() or 1
    ref_per_core = num_tokens / ref_s / cores
    ours_per_core = num_tokens / ours_s / num_proc
    return {
        "docs": num_docs,
        "tokens": num_tokens,
        "encode_batch_tokens_per_s": round(num_tokens / ref_s),
        "encode_batch_threads": cores,
        "stage_tokens_per_s": round(num_tokens / ours_s),
        "stage_num_proc": num_proc,
        "ratio_per_core": round(ours_per_core / ref_per_core, 3),
    }


def _throughput_in_child(num_docs: int, num_proc: int) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--one-run",
            "--docs",
            str(num_docs),
            "--num-proc",
            str(num_proc),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _peak_rss_mb(num_stories: int, num_proc: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-c", RSS_CHILD, tmp, str(num_stories), str(num_proc)],
            check=True,
            capture_output=True,
            text=True,
        )
    return round(float(out.stdout.strip().splitlines()[-1]), 1)


def main() -> None:
    """Measure both and print one JSON line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=40_000, help="documents for the throughput run")
    ap.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--small", type=int, default=5_000, help="stories of the smaller corpus")
    ap.add_argument("--repeats", type=int, default=5, help="throughput runs; the median is kept")
    ap.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_run:  # one throughput run, in this fresh process
        print(json.dumps(_throughput(args.docs, args.num_proc)))
        return
    runs = [_throughput_in_child(args.docs, args.num_proc) for _ in range(args.repeats)]
    ratios = [r["ratio_per_core"] for r in runs]
    median = sorted(runs, key=lambda r: r["ratio_per_core"])[len(runs) // 2]
    result = {"bench": "data_stage", **median, "ratio_per_core_runs": ratios}
    small = _peak_rss_mb(args.small, args.num_proc)
    large = _peak_rss_mb(10 * args.small, args.num_proc)
    result |= {
        "rss_corpus_stories": [args.small, 10 * args.small],
        "peak_rss_mb": [small, large],
        "peak_rss_ratio": round(large / small, 3),
        "goal_ratio_per_core": 0.8,
        "goal_peak_rss_mb": 2048,
        "self_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
