"""Throughput of the ``clean`` stage, and its near-dedup against datasketch.

Generates a corpus of ``--mb`` megabytes of raw shards from the project's synthetic generator
(stories, reviews, instructions, plus 15% noise: exact and near duplicates, boilerplate, other
languages, PII, broken encodings, spam), with an eval file for decontamination, then runs the
stage function three times: every rule with MinHash near-dedup, every rule without it, and every
rule with the C4 line filters (``clean.lines``, off by default) on as well. Prints
MB/s of raw text in wall-clock time (total and per worker process) and per CPU-second (robust
when other jobs share the machine). Finally compares near-dedup with datasketch (MinHash +
MinHashLSH, same threshold, permutations, shingles and keep-first rule) on a sample: speed
ratio and agreement on which documents are dropped.

    .venv/bin/python benchmarks/clean_throughput.py --mb 200           # the reference measurement
    .venv/bin/python benchmarks/clean_throughput.py --mb 20 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.config import Paths
from lmpipe.data import clean
from lmpipe.data.config import CleanConfig
from lmpipe.data.dedup import datasketch_near_duplicates, minhash_signatures, near_duplicates
from lmpipe.data.shards import ShardWriter, doc_id, make_table, read_documents
from lmpipe.data.synthetic import generate
from lmpipe.data.textstats import EMPTY_NORM, tokenize

BATCH_DOCS = 20_000


def make_corpus(root: Path, mb: float, seed: int) -> tuple[int, int]:
    """Write >= ``mb`` MB of raw text as shards under root/data/raw and an eval file; return
    (docs, bytes)."""
    writer = ShardWriter(Paths(root).raw, BATCH_DOCS)
    docs = size = 0
    part = 0
    eval_texts: list[str] = []
    rng = np.random.default_rng(seed)
    while size < mb * 1e6:
        records = list(generate(BATCH_DOCS, noise_fraction=0.15, seed=seed + part))
        texts = [t for t, _ in records]
        writer.write(make_table([doc_id(t) for t in texts], texts, ["synthetic"] * len(texts),
                                [json.dumps(m) for _, m in records]))
        # an eval set of the corpus' vocabulary in other orders: the decontamination index is
        # probed for every n-gram of every document (a hit would end the probing early)
        eval_texts.extend(" ".join(rng.permutation(t.split())) for t in texts[:: len(texts) // 50][:50])
        docs += len(texts)
        size += sum(len(t.encode()) for t in texts)
        part += 1
    writer.close()
    with open(root / "eval.jsonl", "w", encoding="utf-8") as handle:
        for text in eval_texts[:200]:
            handle.write(json.dumps({"text": text}) + "\n")
    return docs, size


def timed_run(cfg: CleanConfig, paths: Paths) -> dict[str, Any]:
    """Run the stage; wall seconds include starting the workers, CPU seconds (the stage's own
    count: this process plus the workers' chunks) do not."""
    wall0 = time.perf_counter()
    summary = clean.run(cfg, paths)
    return {**summary, "wall_s": time.perf_counter() - wall0, "cpu_s": summary["cpu_seconds"]}


def reference(paths: Paths, sample_mb: float, threshold: float, num_perm: int, shingle: int) -> dict[str, float]:
    """Near-dedup of the first ``sample_mb`` of clean text: lmpipe vs datasketch."""
    table = read_documents(paths.raw)
    sizes = np.cumsum([len(t.encode()) for t in table.column("text").to_pylist()])
    table = table.slice(0, int(np.searchsorted(sizes, sample_mb * 1e6)) + 1)
    texts = table.column("text")
    mb = sum(len(t.encode()) for t in texts.to_pylist()) / 1e6

    start = time.perf_counter()
    batch = tokenize(texts)
    rows = np.arange(len(batch))
    ours = near_duplicates(minhash_signatures(batch, rows, num_perm, shingle, 1), threshold)
    ours_s = time.perf_counter() - start

    # datasketch gets the same shingles (our normalised words), as bytes
    shingles = []
    for d in rows:
        lo, hi = batch.tok_offsets[d], batch.tok_offsets[d + 1]
        words = batch.tok_hash[lo:hi][(batch.tok_flags[lo:hi] & EMPTY_NORM) == 0]
        k = min(shingle, len(words))
        shingles.append([words[i: i + k].tobytes() for i in range(len(words) - k + 1)] if k else [b""])
    start = time.perf_counter()
    theirs = datasketch_near_duplicates(shingles, threshold, num_perm)
    theirs_s = time.perf_counter() - start
    both = (ours >= 0) & (theirs >= 0)
    return {
        "sample_mb": mb, "docs": len(rows), "lmpipe_s": ours_s, "datasketch_s": theirs_s,
        "speedup": theirs_s / ours_s, "dropped_lmpipe": int((ours >= 0).sum()),
        "dropped_datasketch": int((theirs >= 0).sum()), "dropped_both": int(both.sum()),
        "agreement": float(((ours >= 0) == (theirs >= 0)).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=200.0, help="Raw text to generate, in MB (default 200).")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Worker processes (default: all cores).")
    parser.add_argument("--reference-mb", type=float, default=5.0, help="Sample size for the datasketch comparison.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="Keep the generated corpus directory.")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="lmpipe-clean-bench-"))
    try:
        t0 = time.perf_counter()
        docs, size = make_corpus(root, args.mb, args.seed)
        print(f"corpus: {docs} docs, {size / 1e6:.1f} MB raw text in {time.perf_counter() - t0:.0f} s ({root})")
        paths = Paths(root)
        base = {"workers": args.workers, "decontaminate": {"eval_files": ["eval.jsonl"]}}
        rows = []
        runs: tuple[tuple[str, dict[str, Any]], ...] = (
            ("all rules + near-dedup", {}), ("all rules, no near-dedup", {"near_dedup": {"enabled": False}}),
            ("all rules + C4 lines + near-dedup", {"lines": {"enabled": True}}))
        for label, extra in runs:
            cfg = CleanConfig.model_validate({**base, **extra})
            result = timed_run(cfg, paths)
            mb = result["bytes_in"] / 1e6
            rows.append((label, result["docs_out"], result["wall_s"], mb / result["wall_s"],
                         mb / result["wall_s"] / result["workers"], mb / result["cpu_s"], result["workers"]))
        print(f"\n{'run':<34} {'docs out':>9} {'wall s':>7} {'MB/s':>7} {'MB/s/core':>10} {'MB/cpu-s':>9} workers")
        for label, out, wall, total, per_core, per_cpu, workers in rows:
            print(f"{label:<34} {out:>9} {wall:>7.1f} {total:>7.1f} {per_core:>10.1f} {per_cpu:>9.1f} {workers:>7}")
        nd = CleanConfig().near_dedup
        ref = reference(paths, args.reference_mb, nd.threshold, nd.num_perm, nd.shingle_size)
        print(f"\nnear-dedup on a {ref['sample_mb']:.1f} MB sample ({ref['docs']} docs), threshold {nd.threshold}, "
              f"{nd.num_perm} permutations, {nd.shingle_size}-word shingles:")
        print(f"  lmpipe {ref['lmpipe_s']:.2f} s, datasketch {ref['datasketch_s']:.2f} s: {ref['speedup']:.0f}x faster")
        print(f"  dropped: lmpipe {ref['dropped_lmpipe']}, datasketch {ref['dropped_datasketch']}, both "
              f"{ref['dropped_both']}; agreement on every document's fate {ref['agreement']:.4%}")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
