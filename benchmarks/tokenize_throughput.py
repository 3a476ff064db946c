"""Throughput of the ``tokenize`` stage against single-process sentencepiece, on the same text.

    python benchmarks/tokenize_throughput.py --mb 20 --workers 2
    python benchmarks/tokenize_throughput.py --mb 20 --workers 2 --layout sharded --shard-docs 5000
    python benchmarks/tokenize_throughput.py --mb 20 --layout sharded --shard-docs 5000 --engine ray

Builds a temporary project whose train split is ``--mb`` MB of text (WikiText-2 validation and
Tiny Shakespeare from ../shared/data repeated to size when present, else generated sentences),
trains a tokenizer on one copy of that text with the ``tokenizer`` stage, then times:

- the ``tokenize`` stage (``lmpipe.tokenizer.shards.run``) with ``--workers`` processes: parquet
  reading, encoding, EOS insertion and writing ``train.bin``, end to end, ``--repeat`` times (the
  first run also starts the worker fork server, about a second once per process); with
  ``--layout sharded`` it writes one ``train-NNNNN.bin`` per parquet shard of ``--shard-docs``
  documents instead, and with ``--engine ray`` it runs on a Ray started here on ``--workers`` CPUs
  (one task per shard; Ray's start is not timed, its workers' first imports are in run 1);
- ``SentencePieceProcessor.encode`` of the same documents in one process and one thread, text
  already in memory and nothing written (so the comparison favours the baseline).

Prints MB/s of UTF-8 text for both and their ratio. Target: >= 20 MB/s on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from lmpipe import engine
from lmpipe.config import Paths
from lmpipe.data.shards import ShardWriter, doc_ids
from lmpipe.tokenizer import shards, train
from lmpipe.tokenizer.config import TokenizeConfig, TokenizerConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SOURCES = [SHARED / "wikitext2" / "valid.txt", SHARED / "tinyshakespeare" / "input.txt"]


def base_documents() -> tuple[list[str], str]:
    """Documents (blank-line separated paragraphs) of the shared corpora, or generated ones."""
    if all(path.is_file() for path in SOURCES):
        text = "\n\n".join(path.read_text(encoding="utf-8") for path in SOURCES)
        # Paragraphs: WikiText separates them with " \n \n", Shakespeare's speeches with "\n\n".
        docs = [d.strip("\n") for d in re.split(r"\n[ \t]*\n", text) if d.strip()]
        return docs, " + ".join(str(p.relative_to(SHARED)) for p in SOURCES)
    rng = random.Random(0)
    words = ["time", "people", "year", "way", "day", "man", "thing", "woman", "life", "child", "world", "school", "state", "family", "student", "group", "country", "problem", "hand", "part", "place", "case", "week", "company", "system", "program", "question", "work", "government", "number", "night", "point", "home", "water", "room", "mother", "area", "money", "story", "fact", "month", "lot"]
    docs = []
    for _ in range(20_000):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))).capitalize() + "."
                     for _ in range(rng.randint(1, 6))]
        docs.append(" ".join(sentences))
    return docs, "generated sentences"


def documents_of_size(megabytes: float) -> tuple[list[str], str]:
    base, source = base_documents()
    docs: list[str] = []
    size, target = 0, int(megabytes * 1e6)
    while size < target:
        for doc in base:
            docs.append(doc)
            size += len(doc.encode("utf-8"))
            if size >= target:
                break
    return docs, source


def write_split(directory: Path, docs: list[str], shard_docs: int = 20_000) -> None:
    writer = ShardWriter(directory, shard_docs=shard_docs)
    writer.write(pa.table({"id": doc_ids(docs), "text": docs, "source": ["bench"] * len(docs),
                           "meta": ["{}"] * len(docs)}))
    writer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20.0, help="MB of text to tokenize (default 20).")
    parser.add_argument("--workers", type=int, default=2, help="Worker processes of the stage (default 2).")
    parser.add_argument("--repeat", type=int, default=2,
                        help="Stage runs (default 2); the first also starts the worker fork server.")
    parser.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--layout", choices=["single", "sharded"], default="single", help="tokenize.layout")
    parser.add_argument("--shard-docs", type=int, default=20_000, help="Documents per parquet shard of the split.")
    parser.add_argument("--engine", choices=["local", "ray"], default="local", help="engine.kind")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base, source = base_documents()
    docs, _ = documents_of_size(args.mb)
    text_bytes = sum(len(d.encode("utf-8")) for d in docs)
    with tempfile.TemporaryDirectory(prefix="lmpipe-bench-") as tmp:
        # The tokenizer is trained once on the base corpus, then used on the repeated one.
        trained, paths = Paths(Path(tmp) / "train-tokenizer"), Paths(Path(tmp) / "bench")
        write_split(trained.split / "train", base)
        started = time.perf_counter()
        train.run(TokenizerConfig.model_validate({"model_type": args.model_type, "vocab_size": args.vocab_size}), trained)
        train_seconds = time.perf_counter() - started
        shutil.copytree(trained.tokenizer, paths.tokenizer)
        write_split(paths.split / "train", docs, args.shard_docs)

        cfg = TokenizeConfig.model_validate({"splits": ["train"], "workers": args.workers, "layout": args.layout})
        stage_seconds = []
        with engine.use(engine.EngineConfig(kind=args.engine, num_cpus=args.workers)) as on:
            if on.kind == "ray":
                engine.connect(on)
            for _ in range(args.repeat):
                started = time.perf_counter()
                summary = shards.run(cfg, paths)
                stage_seconds.append(time.perf_counter() - started)

        sp, _ = train.load_tokenizer(paths.tokenizer)
        started = time.perf_counter()
        baseline_tokens = sum(len(ids) for ids in sp.encode(docs, num_threads=1))
        baseline_seconds = time.perf_counter() - started

    assert summary["train_tokens"] == baseline_tokens + len(docs), "stage and baseline disagree"
    mb = text_bytes / 1e6
    baseline_rate = mb / baseline_seconds
    print(f"corpus: {source}, {mb:.1f} MB, {len(docs)} documents; {args.model_type} vocab {args.vocab_size} "
          f"(trained on one copy in {train_seconds:.1f} s), {text_bytes / baseline_tokens:.2f} bytes/token")
    print(f"machine: {os.cpu_count()} cores visible, load average {os.getloadavg()[0]:.2f} at the end")
    for run, seconds in enumerate(stage_seconds, 1):
        print(f"tokenize stage, {args.engine}, {args.layout}, {args.workers} workers, run {run}: {mb / seconds:6.1f} MB/s ({seconds:.2f} s, "
              f"ratio {mb / seconds / baseline_rate:.2f}x)")
    print(f"sentencepiece, 1 process, 1 thread: {baseline_rate:6.1f} MB/s ({baseline_seconds:.2f} s, no I/O)")
    best = mb / min(stage_seconds)
    print(f"best stage run: {best:.1f} MB/s; target >= 20 MB/s: {'met' if best >= 20 else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
