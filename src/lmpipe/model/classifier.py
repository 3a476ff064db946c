"""A GPT with a classification head: the model classes, their head file and their loading.

The head is a linear layer on the final hidden states: of a text, pooled (``last``: the final
token, which has attended to the whole text; ``mean``: the average over real tokens; ``first``:
the first token, BERT's [CLS] position, which sees the whole text only in a bidirectional
encoder), or of every token (token classification, ``level: token``). The backbone is a causal
decoder or a masked-LM encoder (``bidirectional``; Devlin et al. 2019 fine-tune it the same way, a
linear head on the final states, attention kept bidirectional and masked to the real tokens). The
backbone is saved with :func:`lmpipe.model.io.save_model`; the head alone goes to
``head.safetensors`` next to it, and config.json's ``classifier`` section names the labels, the
level (``sequence`` or ``token``), the pooling and the head file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from lmpipe.errors import DataError
from lmpipe.model.gpt import GPT
from lmpipe.model.io import ExpectedTokenizer, load_model

HEAD_FILE = "head.safetensors"
POOLINGS = ("last", "mean", "first")


class HeadModel(nn.Module):
    """A GPT backbone with dropout and a linear head on its final hidden states: the part the
    sequence classifier and the token classifier share (the head, its init, its file)."""

    def __init__(self, backbone: GPT, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        # The language-model heads are never run here: frozen, so no optimizer or DDP waits for
        # their gradients (a head tied to the embedding stays trainable through the embedding).
        unused = [*(backbone.mlm_head.parameters() if backbone.mlm_head is not None else ()),
                  *(() if backbone.config.tie_weights else backbone.lm_head.parameters())]
        for param in unused:
            param.requires_grad_(False)
        self.dropout = nn.Dropout(dropout)
        # Named 'classifier', not 'head': peft matches modules_to_save by name suffix, and
        # 'head' would also catch the backbone's lm_head.
        self.classifier = nn.Linear(backbone.config.n_embd, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)  # GPT-2's init, as the rest of the model
        nn.init.zeros_(self.classifier.bias)


class ClassificationModel(HeadModel):
    """One label per text: the head on the pooled final hidden state."""

    def __init__(self, backbone: GPT, num_labels: int, pooling: str = "last", dropout: float = 0.1) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        super().__init__(backbone, num_labels, dropout)
        self.pooling = pooling

    def features(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """(B, n_embd) pooled states of right-padded ``idx`` with ``lengths`` real tokens per row."""
        hidden = self.backbone.hidden_states(idx, lengths)
        if self.pooling == "last":
            return hidden[torch.arange(idx.shape[0], device=idx.device), lengths - 1]
        if self.pooling == "first":
            return hidden[:, 0]
        mask = (torch.arange(idx.shape[1], device=idx.device)[None, :] < lengths[:, None]).to(hidden.dtype)
        return (hidden * mask[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)

    def forward(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """(B, num_labels) logits."""
        return self.classifier(self.dropout(self.features(idx, lengths)))


class TokenClassificationModel(HeadModel):
    """One label per token (sequence labelling): the head on every position's final hidden state.

    On a causal backbone a token's state has seen the tokens before it and itself; on a
    bidirectional (masked-LM) one, the whole sentence."""

    def forward(self, idx: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(B, T, num_labels) logits of every position of ``idx`` (B, T); ``lengths``: the real
        tokens of right-padded rows, which a bidirectional backbone must not attend past."""
        return self.classifier(self.dropout(self.backbone.hidden_states(idx, lengths)))


def head_bytes(model: HeadModel) -> bytes:
    """The head's weights as safetensors (the backbone is saved with ``save_model``)."""
    state = {name: t.detach().cpu().contiguous() for name, t in model.classifier.state_dict().items()}
    # One metadata key: safetensors writes a multi-key metadata map in no fixed order, and the
    # file must be byte-identical for identical weights (DVC, manifests).
    return save_safetensors(state, metadata={"format": "pt"})


def head_level(config: dict[str, Any]) -> str | None:
    """``sequence`` or ``token`` for a classifier's config.json contents, None for another model.
    config.json's ``classifier.level`` says which; classifiers written before it are sequence-level."""
    spec = config.get("classifier")
    if not isinstance(spec, dict) or "labels" not in spec:
        return None
    return str(spec.get("level", "sequence"))


def _load_head_model(directory: str | Path, level: str, device: str | torch.device,
                     tokenizer: ExpectedTokenizer | None) -> tuple[HeadModel, list[str], dict[str, Any]]:
    directory = Path(directory)
    backbone, config = load_model(directory, tokenizer=tokenizer)
    found = head_level(config)
    if found is None:
        raise DataError("config.json has no 'classifier' section: not a classification model", path=str(directory))
    if found != level:
        what = {"sequence": "a text classifier", "token": "a token classifier"}
        raise DataError(f"config.json describes {what.get(found, found)}, not {what.get(level, level)}",
                        path=str(directory))
    spec = config["classifier"]
    labels = list(spec["labels"])
    model: HeadModel = (TokenClassificationModel(backbone, len(labels), dropout=0.0) if level == "token"
                        else ClassificationModel(backbone, len(labels), spec.get("pooling", "last"), dropout=0.0))
    path = directory / spec.get("head_file", HEAD_FILE)
    if not path.is_file():
        raise DataError(f"no {path.name}", path=str(directory))
    try:
        model.classifier.load_state_dict(load_safetensors(path.read_bytes()))
    except (RuntimeError, ValueError) as err:
        raise DataError(f"head does not match config.json: {str(err).splitlines()[0]}", path=str(path)) from None
    return model.to(device).eval(), labels, config


def load_classifier(directory: str | Path, device: str | torch.device = "cpu", *,
                    tokenizer: ExpectedTokenizer | None = None) -> tuple[ClassificationModel, list[str], dict[str, Any]]:
    """Rebuild a classifier written by the finetune stage: (model in eval mode, labels, config.json).

    Raises DataError when the directory is not a (text) classifier's or its files do not match,
    FingerprintMismatch when ``tokenizer`` is given and the model was trained with another.
    """
    model, labels, config = _load_head_model(directory, "sequence", device, tokenizer)
    assert isinstance(model, ClassificationModel)
    return model, labels, config


def load_token_classifier(directory: str | Path, device: str | torch.device = "cpu", *,
                          tokenizer: ExpectedTokenizer | None = None,
                          ) -> tuple[TokenClassificationModel, list[str], dict[str, Any]]:
    """Rebuild a token classifier written by the finetune stage (``type: token_classification``):
    (model in eval mode, tags, config.json). Raises as :func:`load_classifier`."""
    model, labels, config = _load_head_model(directory, "token", device, tokenizer)
    assert isinstance(model, TokenClassificationModel)
    return model, labels, config
