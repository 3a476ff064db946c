"""Peak memory of the clean stage on real text: the driver's RSS and its children's, per engine.

Builds ``--mb`` MB of raw documents from the reference data in ``../shared/data`` (WikiText-2
paragraphs, tinyshakespeare speeches, SST-2 sentences grouped twenty to a document). Past the
originals, each further copy of a document has 35% of its words replaced by words drawn from the
corpus's own word distribution, which makes it a different document to MinHash; 2% of documents are
followed by an exact copy and 2% by a near copy (1% of words changed), so both dedup rules work.

Each run cleans that corpus with every rule and near dedup on, in its own process, while this
process samples that process tree every 0.1 s (psutil): the driver's peak RSS (also its own
``ru_maxrss``), the peak sum of its descendants' RSS (the local engine's worker pool, or the Ray
raylet, GCS and workers) and the peak of the whole tree. The corpus is written once per size and
reused by every run; all runs must write the same files.

    .venv/bin/python benchmarks/clean_rss.py --mb 5                      # a check that it works
    .venv/bin/python benchmarks/clean_rss.py --mb 200 1000 --cpus 2      # docs/benchmarks.md
    .venv/bin/python benchmarks/clean_rss.py --mb 200 1000 --cpus 2 --ray --memory-mb 64   # + Ray, spill

``--memory-mb`` sets ``clean.near_dedup.memory_mb`` (default: the params default, 4096), so a small
value shows the spilled index's memory on a corpus the in-memory index would hold.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from lmpipe import engine
from lmpipe.config import Paths
from lmpipe.data import clean
from lmpipe.data.config import CleanConfig
from lmpipe.data.shards import ShardWriter, doc_id, make_table
from lmpipe.io import read_manifest

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the project checkout, or ../../shared/data from a worktree under wt/
SHARED = next((p / "shared" / "data" for p in (ROOT.parent, ROOT.parent.parent) if (p / "shared" / "data").is_dir()),
              ROOT.parent / "shared" / "data")
BATCH_DOCS = 5_000


def base_documents(shared: Path) -> list[str]:
    """The reference data as documents (each a few hundred words at most)."""
    docs: list[str] = []
    wiki = (shared / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
    docs += [p.strip() for p in wiki.split("\n") if len(p.split()) >= 40 and not p.strip().startswith("=")]
    speeches = re.split(r"\n\s*\n", (shared / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8"))
    block: list[str] = []
    for speech in speeches:  # speeches are short: group them into documents of >= 120 words
        block.append(speech.strip())
        if sum(len(s.split()) for s in block) >= 120:
            docs.append("\n\n".join(block))
            block = []
    lines = (shared / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    sentences = [line.split("\t", 1)[-1].strip() for line in lines]
    sentences = [s[:1].upper() + s[1:] + ("" if s.endswith(".") else " .") for s in sentences if len(s.split()) >= 6]
    docs += [" ".join(sentences[i:i + 20]) for i in range(0, len(sentences) - 20, 20)]
    return docs


def make_corpus(root: Path, mb: float, shared: Path, seed: int = 0) -> tuple[int, int]:
    """Write >= ``mb`` MB of raw text under root/data/raw; return (documents, bytes)."""
    base = base_documents(shared)
    words = [doc.split() for doc in base]
    vocab, inverse = np.unique(np.concatenate([np.array(w, dtype=object) for w in words]).astype(str),
                               return_inverse=True)
    ids, start = [], 0
    for w in words:
        ids.append(inverse[start:start + len(w)])
        start += len(w)
    rng = np.random.default_rng(seed)
    pool = inverse  # drawing positions of the whole stream draws words by their frequency

    def variant(doc: np.ndarray, fraction: float) -> str:
        out = doc.copy()
        mask = rng.random(len(out)) < fraction
        out[mask] = pool[rng.integers(0, len(pool), int(mask.sum()))]
        return " ".join(vocab[out].tolist())

    writer = ShardWriter(Paths(root).raw, 20_000)
    docs = size = 0
    copy = 0
    pending: list[str] = []
    while size < mb * 1e6:
        for i in rng.permutation(len(base)).tolist():
            text = base[i] if copy == 0 else variant(ids[i], 0.35)
            pending.append(text)
            roll = rng.random()
            if roll < 0.02:
                pending.append(text)
            elif roll < 0.04:
                pending.append(variant(np.array([np.searchsorted(vocab, w) for w in text.split()]), 0.01))
            if len(pending) >= BATCH_DOCS:
                docs, size = _flush(writer, pending, docs, size)
                pending = []
                if size >= mb * 1e6:
                    break
        copy += 1
    if pending:
        docs, size = _flush(writer, pending, docs, size)
    writer.close()
    return docs, size


def _flush(writer: ShardWriter, texts: list[str], docs: int, size: int) -> tuple[int, int]:
    writer.write(make_table([doc_id(t) for t in texts], texts, ["shared"] * len(texts), ["{}"] * len(texts)))
    return docs + len(texts), size + sum(len(t.encode()) for t in texts)


def one_run(root: Path, kind: str, cpus: int, memory_mb: int | None) -> dict[str, Any]:
    """Clean root/data/raw into root/data/clean in this process: the summary and own peak RSS."""
    data: dict[str, Any] = {"workers": cpus}
    if memory_mb is not None:
        data["near_dedup"] = {"memory_mb": memory_mb}
    cfg = CleanConfig.model_validate(data)
    shutil.rmtree(Paths(root).clean, ignore_errors=True)
    with engine.use(engine.EngineConfig(kind=kind, num_cpus=cpus)):  # type: ignore[arg-type]
        start = time.perf_counter()
        summary = clean.run(cfg, Paths(root))
        wall = time.perf_counter() - start
    return {"kind": kind, "cpus": cpus, "wall_s": wall, "mb": summary["bytes_in"] / 1e6,
            "docs_in": summary["docs_in"], "docs_out": summary["docs_out"],
            "removed_near": summary.get("removed.near_dedup", 0),
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "files": read_manifest(Paths(root).clean)["files"]}


def sample_tree(pid: int, stop: threading.Event, peaks: dict[str, float]) -> None:
    """Peak RSS (MB) of process ``pid`` ("driver"), of all its descendants ("children") and of both."""
    try:
        driver = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.is_set():
        try:
            own = driver.memory_info().rss
            kids = 0
            for child in driver.children(recursive=True):
                with contextlib.suppress(psutil.Error):  # a worker that just exited
                    kids += child.memory_info().rss
        except psutil.Error:
            break
        for key, value in (("driver", own), ("children", kids), ("tree", own + kids)):
            peaks[key] = max(peaks.get(key, 0.0), value / 2**20)
        time.sleep(0.1)


def measured(root: Path, kind: str, cpus: int, memory_mb: int | None) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", str(root), kind, str(cpus), str(memory_mb or 0)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop, peaks = threading.Event(), {}
    sampler = threading.Thread(target=sample_tree, args=(proc.pid, stop, peaks), daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"clean ({kind}, {cpus} CPUs) failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, **{f"peak_{k}_mb": v for k, v in peaks.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, nargs="+", default=[200.0, 1000.0],
                        help="Raw text sizes to build and clean, in MB (default 200 1000).")
    parser.add_argument("--cpus", type=int, default=2, help="Workers of the local engine, CPUs of Ray (default 2).")
    parser.add_argument("--ray", action="store_true", help="Also run on Ray (a local cluster, engine.address null).")
    parser.add_argument("--memory-mb", type=int, help="clean.near_dedup.memory_mb (default: the params default).")
    parser.add_argument("--shared", type=Path, default=SHARED, help=f"Reference data (default {SHARED}).")
    parser.add_argument("--keep", type=Path, help="Build the corpora here and keep them (default: a temp dir).")
    parser.add_argument("--child", nargs=4, metavar=("ROOT", "KIND", "CPUS", "MEMORY_MB"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        root, kind, cpus, memory = args.child
        print(json.dumps(one_run(Path(root), kind, int(cpus), int(memory) or None)))
        return 0
    if not (args.shared / "wikitext2" / "valid.txt").is_file():
        raise SystemExit(f"reference data not found in {args.shared} (pass --shared)")

    top = args.keep or Path(tempfile.mkdtemp(prefix="lmpipe-clean-rss-"))
    same = True
    try:
        rows = []
        for mb in args.mb:
            root = top / f"{mb:g}mb"
            if not Paths(root).raw.is_dir():
                started = time.perf_counter()
                docs, size = make_corpus(root, mb, args.shared)
                print(f"corpus {mb:g} MB: {docs} docs, {size / 1e6:.1f} MB raw text in {root} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
            runs = [measured(root, "local", args.cpus, args.memory_mb)]
            if args.ray:
                runs.append(measured(root, "ray", args.cpus, args.memory_mb))
            same &= all(r["files"] == runs[0]["files"] for r in runs)
            rows += [(mb, r) for r in runs]
        print(f"\n{'MB':>6} {'engine':<6} {'cpus':>4} {'docs in':>9} {'docs out':>9} {'near dups':>9} {'wall s':>7} "
              f"{'MB/s':>6} {'driver MB':>9} {'children MB':>11} {'tree MB':>8}")
        for mb, r in rows:
            print(f"{mb:>6g} {r['kind']:<6} {r['cpus']:>4} {r['docs_in']:>9} {r['docs_out']:>9} {r['removed_near']:>9} "
                  f"{r['wall_s']:>7.1f} {r['mb'] / r['wall_s']:>6.2f} {max(r['ru_maxrss_mb'], r.get('peak_driver_mb', 0)):>9.0f} "
                  f"{r.get('peak_children_mb', 0):>11.0f} {r.get('peak_tree_mb', 0):>8.0f}")
        print(f"\nidentical output files on every engine: {same}")
        return 0 if same else 1
    finally:
        if args.keep is None:
            shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
