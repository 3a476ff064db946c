"""Token classification (named entities): tagged sentences, word-to-piece alignment, loss and
entity-level metrics.

Rows carry a ``tokens`` list (words) and a ``tags`` list of the same length in the IOB2 scheme
(Tjong Kim Sang & Veenstra 1999; the CoNLL-2003 release): ``B-X`` opens an entity of type X,
``I-X`` continues it, ``O`` is outside. With ``strict`` an ``I-X`` that follows ``O`` or a tag of
another type is refused, as IOB2 requires ``B-X`` there. A tag outside the scheme, token and tag
lists of different lengths, or a tag missing from the label set is a DataError at the file and
line (CoNLL files: the line of the offending token).

Words are encoded one by one with the sentencepiece model (each gets its word-start piece, so the
pieces equal those of the space-joined sentence) after a leading EOS, the document separator of
pretraining. As in Hugging Face's token-classification recipe, one piece of each word carries
the word's tag and every other position the target -100, so loss and predictions are per word: the
first piece on a bidirectional backbone, as that recipe does, and the last on a causal one, where
only the last piece has seen the whole word (:func:`label_piece`; config.json records which).
A sentence longer than ``max_length`` pieces is split between words into windows that are
trained on and predicted one by one, then joined again for the scores.

Scores are entity-level precision, recall and F1 from seqeval (Nakayama 2018, conlleval's
definition: an entity counts only when its type and both ends match), micro-averaged, plus a
per-entity-type table. Dev evaluation during training counts the same matches per window, so the
sums add up across batches and ranks (an entity split between two windows counts as two there).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmpipe.config import Paths
from lmpipe.errors import DataError
from lmpipe.model.gpt import IGNORE_INDEX
from lmpipe.train.finetune.config import DataSource
from lmpipe.train.finetune.data import Batch, Row, describe_source, eval_batches, pad_rows, read_rows
from lmpipe.train.objectives import Objective

log = logging.getLogger(__name__)

OUTSIDE = "O"

# ------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class TaggedSentence:
    tokens: list[str]
    tags: list[str]
    row: Row

    def error(self, index: int, message: str) -> DataError:
        """``message`` about token ``index`` (0-based), at its own line for CoNLL rows."""
        lines = self.row.values.get("tag_lines")
        if isinstance(lines, list) and index < len(lines):
            return DataError(message, path=self.row.where, line=lines[index])
        return self.row.error(f"token {index + 1} ({self.tokens[index]!r}): {message}")


def _string_list(row: Row, name: str) -> list[str]:
    value = row.get(name)
    if isinstance(value, tuple | np.ndarray):
        value = list(value)
    if not isinstance(value, list) or not value:
        raise row.error(f"column '{row.column(name)}' must be a non-empty list, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise row.error(f"column '{row.column(name)}': item {i + 1} must be non-empty text, got {item!r} "
                            "(integer tag ids: map them to their names first)")
    return [item.strip() for item in value]


def check_scheme(sentence: TaggedSentence, strict: bool) -> None:
    """Raise DataError for a tag outside IOB2 (O, B-X, I-X) or, when ``strict``, an I-X that does
    not continue an entity of type X."""
    previous = OUTSIDE
    for i, tag in enumerate(sentence.tags):
        if tag != OUTSIDE and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            raise sentence.error(i, f"tag {tag!r} is outside the IOB2 scheme (O, B-TYPE, I-TYPE)")
        if strict and tag.startswith("I-") and previous[2:] != tag[2:]:
            raise sentence.error(i, f"tag {tag!r} follows {previous!r}: in IOB2 an entity starts with B-{tag[2:]} "
                                 "(set strict: false to read it as opening one)")
        previous = tag


def read_tagged(source: DataSource, paths: Paths, strict: bool = True) -> list[TaggedSentence]:
    """The tagged sentences of a source; DataError on the first missing column, token and tag
    counts that differ, or a tag outside the scheme."""
    items = []
    for row in read_rows(source, paths):
        tokens, tags = _string_list(row, "tokens"), _string_list(row, "tags")
        if len(tokens) != len(tags):
            raise row.error(f"{len(tokens)} tokens but {len(tags)} tags: every token needs one tag")
        sentence = TaggedSentence(tokens, tags, row)
        check_scheme(sentence, strict)
        items.append(sentence)
    if not items:
        raise DataError(f"no tagged sentences in {describe_source(source)}: the source is empty or no document "
                        "has the requested kind")
    return items


def resolve_tags(train: Sequence[TaggedSentence], configured: list[str] | None) -> list[str]:
    """The tag set: ``configured`` or the sorted distinct training tags (at least two)."""
    labels = list(configured) if configured is not None else sorted({t for s in train for t in s.tags})
    if len(labels) < 2:
        raise DataError(f"the training data has only the tag(s) {labels}: a tagger needs at least 2",
                        path=train[0].row.where)
    return labels


# ----------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class TagExample:
    """One window of a sentence: ``<eos>`` and the pieces of consecutive words."""

    ids: np.ndarray  # (n,) int64: <eos> pieces of each word
    target: np.ndarray  # (n,) int64: tag id at each word's labelled piece, -100 elsewhere
    item: int  # index of its sentence among those encoded together
    words: int  # words of the sentence in this window


def label_piece(bidirectional: bool) -> str:
    """Which piece of a word carries its tag: ``first`` on a bidirectional backbone (BERT, Hugging
    Face's recipe), ``last`` on a causal one, where the first piece has not yet seen the rest of
    its word ("▁S" of "▁S ilva" cannot tell Silva from "said")."""
    return "first" if bidirectional else "last"


class WordEncoder:
    """A word list as windows of at most ``max_length`` ids: ``<eos>`` and the pieces of
    consecutive words, with the position of each word's labelled piece (``piece``: first or last).
    A sentence too long for one window continues in the next, split between words; a word longer
    than a window alone keeps the pieces that fit."""

    def __init__(self, sp: spm.SentencePieceProcessor, eos_id: int, max_length: int, piece: str = "first") -> None:
        if max_length < 2:
            raise ValueError("max_length must leave room for the EOS and a word")
        if piece not in ("first", "last"):
            raise ValueError(f"piece must be 'first' or 'last', got {piece!r}")
        self.sp, self.eos_id, self.max_length, self.piece = sp, eos_id, max_length, piece

    def __call__(self, words: Sequence[str]) -> list[tuple[np.ndarray, list[int]]]:
        """(ids, position of each word's labelled piece) of each window, in order."""
        windows = []
        ids, positions = [self.eos_id], []
        for word in words:
            pieces = (list(self.sp.encode(word)) or [self.sp.unk_id()])[: self.max_length - 1]
            if positions and len(ids) + len(pieces) > self.max_length:
                windows.append((np.asarray(ids, dtype=np.int64), positions))
                ids, positions = [self.eos_id], []
            start = len(ids)
            ids.extend(pieces)
            positions.append(start if self.piece == "first" else len(ids) - 1)
        windows.append((np.asarray(ids, dtype=np.int64), positions))
        return windows


def build_examples(items: Sequence[TaggedSentence], labels: Sequence[str], encoder: WordEncoder) -> list[TagExample]:
    """The windows of every sentence, in order; DataError naming the row of a tag outside the label set."""
    index = {label: i for i, label in enumerate(labels)}
    out = []
    for number, item in enumerate(items):
        for i, tag in enumerate(item.tags):
            if tag not in index:
                raise item.error(i, f"tag {tag!r} is not in the label set ({', '.join(labels)}); fix the row or "
                                 "list it in labels")
        word = 0
        for ids, positions in encoder(item.tokens):
            target = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
            target[positions] = [index[tag] for tag in item.tags[word:word + len(positions)]]
            out.append(TagExample(ids, target, number, len(positions)))
            word += len(positions)
    return out


class TagCollate:
    """Right-padded ``input`` (pad id), ``length`` and ``target`` (-100) tensors of a list of
    examples. ``length`` keeps a bidirectional backbone from attending to the padding."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[TagExample]) -> Batch:
        return {"input": pad_rows([e.ids for e in examples], self.pad_id),
                "length": torch.tensor([len(e.ids) for e in examples], dtype=torch.long),
                "target": pad_rows([e.target for e in examples], IGNORE_INDEX)}


# ---------------------------------------------------------------------------------- objective


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The (type, first, last) word spans of a tag sequence, as seqeval's default (conlleval) mode
    reads them: an I-X after O or another type opens an entity."""
    from seqeval.metrics.sequence_labeling import get_entities

    return set(get_entities(list(tags)))


class TokenClassificationObjective(Objective):
    """Cross-entropy over the words' labelled pieces; dev sums: [loss sum, words, words right,
    entities right, entities predicted, entities in the gold tags]."""

    sums_size = 6

    def __init__(self, labels: Sequence[str], monitor: str = "f1") -> None:
        self.labels, self.monitor = list(labels), monitor
        self.mode = "min" if monitor == "loss" else "max"

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        logits = model(batch["input"], batch["length"])
        return F.cross_entropy(logits.float().flatten(0, 1), batch["target"].flatten(), ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: Batch) -> Tensor:
        logits = model(batch["input"], batch["length"]).float()
        target = batch["target"]
        loss_sum = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        mask = target != IGNORE_INDEX
        predicted = logits.argmax(-1)
        right = found = gold = 0
        for row_pred, row_true in zip(predicted.cpu().tolist(), target.cpu().tolist(), strict=True):
            pairs = [(p, t) for p, t in zip(row_pred, row_true, strict=True) if t != IGNORE_INDEX]
            pred_spans = entities([self.labels[p] for p, _ in pairs])
            true_spans = entities([self.labels[t] for _, t in pairs])
            right, found, gold = right + len(pred_spans & true_spans), found + len(pred_spans), gold + len(true_spans)
        stats = [loss_sum, mask.sum().float(), ((predicted == target) & mask).sum().float()]
        counts = torch.tensor([right, found, gold], dtype=torch.float32, device=logits.device)
        return torch.cat([torch.stack(stats), counts])

    def metrics(self, sums: Tensor) -> dict[str, float]:
        loss_sum, words, correct, right, found, gold = sums.detach().cpu().double().tolist()
        precision = right / found if found else 0.0
        recall = right / gold if gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"loss": loss_sum / max(words, 1.0), "token_accuracy": correct / max(words, 1.0),
                "precision": precision, "recall": recall, "f1": f1}


# ------------------------------------------------------------------------------- final scores


@torch.no_grad()
def predict_tags(model: nn.Module, examples: Sequence[TagExample], batches: Sequence[Batch], labels: Sequence[str],
                 device: torch.device | str = "cpu") -> list[list[str]]:
    """Predicted word tags of every sentence, its windows joined (``batches``: ``examples``
    collated in order)."""
    was_training = model.training
    model.eval()
    windows: list[list[str]] = []
    for batch in batches:
        predicted = model(batch["input"].to(device), batch["length"].to(device)).argmax(-1).cpu().numpy()
        for row, target in zip(predicted, batch["target"].numpy(), strict=True):
            windows.append([labels[p] for p in row[target != IGNORE_INDEX]])
    model.train(was_training)
    out: dict[int, list[str]] = defaultdict(list)
    for tags, example in zip(windows, examples, strict=True):
        out[example.item] += tags
    return [out[i] for i in sorted(out)]


def score_tagger(model: nn.Module, items: Sequence[TaggedSentence], examples: Sequence[TagExample],
                 labels: Sequence[str], pad_id: int, batch_size: int,
                 device: torch.device | str = "cpu") -> dict[str, Any]:
    """:func:`entity_scores` of ``model``'s tags for ``items`` (``examples``: the items encoded)."""
    batches = eval_batches(examples, TagCollate(pad_id), batch_size)
    return entity_scores([item.tags for item in items], predict_tags(model, examples, batches, labels, device))


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, Any]:
    """seqeval's micro entity precision/recall/F1, token accuracy, and per entity type precision,
    recall, F1 and support (gold entities). An undefined ratio counts as 0."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    gold, predicted = [list(g) for g in gold], [list(p) for p in predicted]
    words = sum(len(g) for g in gold)
    same = sum(a == b for g, p in zip(gold, predicted, strict=True) for a, b in zip(g, p, strict=True))
    overall = {"precision": float(precision_score(gold, predicted, zero_division=0)),
               "recall": float(recall_score(gold, predicted, zero_division=0)),
               "f1": float(f1_score(gold, predicted, zero_division=0)),
               "token_accuracy": same / words if words else 0.0,
               "entities": sum(len(entities(g)) for g in gold)}
    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    per_entity = {name: {"precision": float(r["precision"]), "recall": float(r["recall"]), "f1": float(r["f1-score"]),
                         "support": int(r["support"])}
                  for name, r in sorted(report.items()) if not name.endswith(" avg")}
    return {"overall": overall, "per_entity": per_entity}


def majority_tagger(train: Sequence[TaggedSentence]) -> dict[str, str]:
    """Each training word's most frequent tag (ties: the first seen), the baseline a tagger must
    beat; words never seen in training are tagged ``O``."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for sentence in train:
        for token, tag in zip(sentence.tokens, sentence.tags, strict=True):
            counts[token][tag] += 1
    return {token: tags.most_common(1)[0][0] for token, tags in counts.items()}


def tag_with(lookup: dict[str, str], items: Sequence[TaggedSentence]) -> list[list[str]]:
    return [[lookup.get(token, OUTSIDE) for token in item.tokens] for item in items]
