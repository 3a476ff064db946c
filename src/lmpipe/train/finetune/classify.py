"""Single-label text classification on the decoder: model, data, loss, metrics, confusion matrix.

The model is the pretrained GPT plus a linear head on a pooled hidden state. Input is
``<eos> text <eos>``: the leading EOS is the document separator the model saw in pretraining, the
trailing one a fixed position whose state has attended to the whole text (the end-token pooling of
GPT, Radford et al. 2018, sec. 3.3). ``pooling: last`` reads that token; ``mean`` averages every
token's state. Batches are right-padded: the model is causal, so real tokens never see the padding.

The model itself (:class:`lmpipe.model.classifier.ClassificationModel`), its head file and its
loading live in ``lmpipe.model``. Rows are validated as they are read: a missing column, an empty text, a missing label or one
outside the label set is a DataError naming the file and line (or row).
"""

from __future__ import annotations

import io
import logging
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
from lmpipe.train.finetune.config import DataSource
from lmpipe.train.finetune.data import Batch, Row, describe_source, pad_rows, read_rows
from lmpipe.train.objectives import Objective

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str
    row: Row


def _label_text(row: Row) -> str:
    value = row.get("label")
    if isinstance(value, bool) or value is None:
        raise row.error(f"column '{row.column('label')}' must be a label (text or integer), got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        raise row.error(f"column '{row.column('label')}' must be a label (text or integer), got {type(value).__name__}")
    if not value.strip():
        raise row.error(f"column '{row.column('label')}' is empty")
    return value.strip()


def read_labelled(source: DataSource, paths: Paths) -> list[LabelledText]:
    """The (text, label) rows of a source; DataError on the first missing column or empty value."""
    items = [LabelledText(row.text("text"), _label_text(row), row) for row in read_rows(source, paths)]
    if not items:
        raise DataError(f"no examples in {describe_source(source)}: the source is empty or no document has "
                        "the requested kind")
    return items


def resolve_labels(train: Sequence[LabelledText], configured: list[str] | None) -> list[str]:
    """The label set: ``configured`` or the sorted distinct training labels (at least two)."""
    labels = list(configured) if configured is not None else sorted({item.label for item in train})
    if len(labels) < 2:
        raise DataError(f"the training data has only the label(s) {labels}: a classifier needs at least 2",
                        path=train[0].row.where)
    return labels


def label_ids(items: Sequence[LabelledText], labels: Sequence[str]) -> np.ndarray:
    """Index of each item's label; DataError naming the row of a label outside the set."""
    index = {label: i for i, label in enumerate(labels)}
    out = np.empty(len(items), dtype=np.int64)
    for i, item in enumerate(items):
        if item.label not in index:
            raise item.row.error(f"label {item.label!r} is not in the label set ({', '.join(labels)}); "
                                 "fix the row or list it in labels")
        out[i] = index[item.label]
    return out


# ----------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class ClassExample:
    ids: np.ndarray  # (n,) int64: <eos> text <eos>
    label: int


class TextEncoder:
    """``<eos> text <eos>`` ids, the text cut so the whole fits ``max_length`` tokens."""

    def __init__(self, sp: spm.SentencePieceProcessor, eos_id: int, max_length: int) -> None:
        if max_length < 3:
            raise ValueError("max_length must leave room for two EOS tokens and some text")
        self.sp, self.eos_id, self.max_length = sp, eos_id, max_length

    def __call__(self, text: str) -> np.ndarray:
        ids = list(self.sp.encode(text))[: self.max_length - 2]
        return np.asarray([self.eos_id, *ids, self.eos_id], dtype=np.int64)


def build_examples(items: Sequence[LabelledText], labels: Sequence[str], encoder: TextEncoder) -> list[ClassExample]:
    ids = label_ids(items, labels)
    return [ClassExample(encoder(item.text), int(label)) for item, label in zip(items, ids, strict=True)]


class ClassCollate:
    """Right-padded ``input`` (pad id), ``length`` and ``label`` tensors of a list of examples."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[ClassExample]) -> Batch:
        return {
            "input": pad_rows([e.ids for e in examples], self.pad_id),
            "length": torch.tensor([len(e.ids) for e in examples], dtype=torch.long),
            "label": torch.tensor([e.label for e in examples], dtype=torch.long),
        }


def class_weights(setting: str | list[float], train_labels: np.ndarray, num_labels: int) -> list[float] | None:
    """Per-class loss weights: None for 'none'; 'balanced' is n / (k * count_c) (King & Zeng 2001,
    scikit-learn's convention), so every class carries the same total weight."""
    if setting == "none":
        return None
    if isinstance(setting, list):
        if len(setting) != num_labels:
            raise DataError(f"class_weights has {len(setting)} weights for {num_labels} labels")
        return [float(w) for w in setting]
    counts = np.bincount(train_labels, minlength=num_labels).astype(np.float64)
    return [float(len(train_labels) / (num_labels * c)) if c else 0.0 for c in counts]


# ---------------------------------------------------------------------------------- objective


class ClassificationObjective(Objective):
    """(Weighted) cross-entropy; dev metrics from the confusion matrix summed over batches."""

    def __init__(self, num_labels: int, weights: list[float] | None = None, monitor: str = "accuracy") -> None:
        self.num_labels, self.monitor = num_labels, monitor
        self.weights = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
        self.mode = "min" if monitor == "loss" else "max"
        self.sums_size = 2 + num_labels * num_labels

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        logits = model(batch["input"], batch["length"])
        weight = self.weights.to(logits.device) if self.weights is not None else None
        return F.cross_entropy(logits.float(), batch["label"], weight=weight)

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: Batch) -> Tensor:
        """[loss sum, examples, confusion counts (true x predicted, flattened)]."""
        logits = model(batch["input"], batch["length"]).float()
        labels = batch["label"]
        loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        k = self.num_labels
        confusion = torch.bincount(labels * k + logits.argmax(-1), minlength=k * k).float()
        return torch.cat([torch.stack([loss_sum, torch.tensor(float(labels.numel()), device=logits.device)]),
                          confusion])

    def metrics(self, sums: Tensor) -> dict[str, float]:
        values = sums.detach().cpu().double().numpy()
        confusion = values[2:].reshape(self.num_labels, self.num_labels)
        summary = classification_metrics(confusion)
        return {"loss": float(values[0] / max(values[1], 1.0)), **summary["overall"]}


def classification_metrics(confusion: np.ndarray, labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 and per-class scores of a (true x predicted) confusion
    matrix. An undefined ratio (no prediction or no example of a class) counts as 0, as
    scikit-learn's ``zero_division=0``."""
    confusion = np.asarray(confusion, dtype=np.float64)
    k = confusion.shape[0]
    labels = list(labels) if labels is not None else [str(i) for i in range(k)]
    true_pos = np.diag(confusion)
    predicted, actual, total = confusion.sum(0), confusion.sum(1), confusion.sum()
    precision = np.divide(true_pos, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros(k), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    overall = {
        "accuracy": float(true_pos.sum() / total) if total else 0.0,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "majority_accuracy": float(actual.max() / total) if total else 0.0,
    }
    per_class = {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
                 for label, p, r, f, n in zip(labels, precision, recall, f1, actual, strict=True)}
    return {"overall": overall, "per_class": per_class}


@torch.no_grad()
def predict(model: nn.Module, batches: Sequence[Batch], device: torch.device | str = "cpu") -> np.ndarray:
    """Predicted label index of every example in ``batches``, in order."""
    was_training = model.training
    model.eval()
    out = [model(b["input"].to(device), b["length"].to(device)).argmax(-1).cpu() for b in batches]
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def confusion_png(confusion: np.ndarray, labels: Sequence[str], title: str) -> bytes:
    """A confusion-matrix heat map (rows: true label, columns: predicted) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(labels)
    fig, ax = plt.subplots(figsize=(2.5 + 0.6 * k, 2 + 0.6 * k), dpi=100)
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    peak = confusion.max() if confusion.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(confusion[i, j])}", ha="center", va="center",
                    color="white" if confusion[i, j] > peak / 2 else "black")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
