"""split: deterministic train/val/test split of data/clean by hash of ``id``.

A document's split depends only on its id (a content hash) and the salt, never on the order or
size of the corpus, so a document never moves between splits when the corpus grows, and exact
duplicates (same id) always land together. Optionally drops train documents that share a long
word n-gram with val/test (the same check clean runs against eval files), so val/test numbers are
not inflated by near-copies in train.

Reads ``data/clean/``; writes ``data/split/{train,val,test}/part-*.parquet`` and
``data/split/manifest.json``.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmpipe.config import Paths
from lmpipe.data.config import SplitConfig
from lmpipe.data.gate import require_validated
from lmpipe.data.shards import ShardWriter, iter_shards
from lmpipe.errors import DataError
from lmpipe.io import atomic_dir, write_manifest

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def split_unit(doc_id: str, salt: str) -> float:
    """Map an id to [0, 1) by a salted hash: the split position of the document."""
    digest = hashlib.blake2b(f"{salt}\x00{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_splits(ids: list[str], cfg: SplitConfig) -> np.ndarray:
    """Return an array of split names ('train'/'val'/'test') for ``ids``."""
    units = np.fromiter((split_unit(i, cfg.salt) for i in ids), dtype=np.float64, count=len(ids))
    out = np.full(len(ids), "train", dtype=object)
    out[units < cfg.val_fraction + cfg.test_fraction] = "test"
    out[units < cfg.val_fraction] = "val"
    return out


def run(cfg: SplitConfig, paths: Paths) -> dict[str, Any]:
    """Split data/clean into data/split/{train,val,test}; return counts per split.

    Raises DataError when data/clean has not passed validation as it is now (the gate), when it
    is empty, or when a split with a non-zero fraction would be empty.
    """
    if not any(table.num_rows for _, table in iter_shards(paths.clean)):
        raise DataError("no documents to split (clean removed everything?)", path=str(paths.clean))
    require_validated(paths)
    counts: dict[str, Any] = {}
    with atomic_dir(paths.split) as tmp:
        writers = {name: ShardWriter(tmp / name) for name in SPLITS}
        # Pass 1: val/test, and the held-out text train is checked against. Pass 2 streams train, so
        # memory holds one shard plus the (small) held-out n-gram index, never the whole corpus.
        held_out: list[str] = []
        for _, table in iter_shards(paths.clean):
            names = assign_splits(table.column("id").to_pylist(), cfg)
            for name in ("val", "test"):
                part = table.filter(pa.array(names == name))
                writers[name].write(part)
                if cfg.decontaminate_train:
                    held_out.extend(part.column("text").to_pylist())
        index = None
        if cfg.decontaminate_train and held_out:
            from lmpipe.data.decontam import NgramIndex

            index = NgramIndex.from_texts(held_out, cfg.ngram)
        del held_out
        removed = 0
        for _, table in iter_shards(paths.clean):
            part = table.filter(pa.array(assign_splits(table.column("id").to_pylist(), cfg) == "train"))
            if index is not None and part.num_rows:
                bad = np.asarray(index.contaminated(part.column("text").to_pylist()), dtype=bool)
                removed += int(bad.sum())
                part = part.filter(pa.array(~bad))
            writers["train"].write(part)
        for name, writer in writers.items():
            writer.close()
            counts[f"docs.{name}"] = writer.rows
        for name in SPLITS:
            texts = pa.concat_tables([t for _, t in iter_shards(tmp / name)]).column("text")
            counts[f"bytes.{name}"] = int(pc.sum(pc.binary_length(pc.cast(texts, pa.binary()))).as_py() or 0)
        counts["removed.train_contaminated"] = removed
        if counts["docs.train"] == 0:
            raise DataError("the train split is empty: lower split.val_fraction/test_fraction or add data",
                            path=str(paths.clean))
        total = sum(counts[f"docs.{name}"] for name in SPLITS)
        for name in ("val", "test"):
            fraction = getattr(cfg, f"{name}_fraction")
            if fraction > 0 and counts[f"docs.{name}"] == 0:
                raise DataError(f"the {name} split is empty ({total} documents at {name}_fraction {fraction}): "
                                f"add data, raise split.{name}_fraction, or check what clean removed "
                                "(data/clean/clean_report.json)", path=str(paths.clean))
        write_manifest(tmp, stage="split", config=cfg, inputs={"clean": paths.clean}, counts=counts)
    log.info("split: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    return {**counts, "artifacts": [str(paths.split / "manifest.json")]}
