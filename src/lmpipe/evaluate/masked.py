"""Masked-LM quality: how a bidirectional model (``pretrain.objective: mlm``) is scored.

A masked LM sees every token of its window, those after a position included, so the causal
metrics do not apply: its next-token loss and bits per byte would be scored with the answer in
view, and it neither generates nor decodes left to right (no samples, no decoding speed). It is
scored on what it was trained to do instead:

- **masked-token loss and accuracy**: the pretraining masking (BERT's selection of a share of the
  tokens, 80% of them replaced by the mask token, 10% by a random token, 10% kept: Devlin et al.
  2019, 3.1; :func:`lmpipe.train.data.mask_for_mlm`) at the rate and with the mask id the model
  was trained with (config.json's ``mlm``). The masks come from a fixed seed per window, so every
  run, and every model, is scored on the same positions;
- **pseudo-perplexity** (Salazar et al. 2020, "Masked Language Model Scoring"): each position of
  a window masked in turn, PPPL = exp(-(1/N) sum_t log p(x_t | the window without x_t)). It takes
  one forward pass per token, so it runs on a bounded, evenly spaced sample of windows.

Special tokens (the EOS between documents) are never masked, as in pretraining. Windows are the
stream cut into non-overlapping pieces of block_size tokens (the last one may be shorter).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmpipe.errors import DataError
from lmpipe.evaluate.config import MaskedLMSettings
from lmpipe.evaluate.lm import autocast_for
from lmpipe.model.gpt import GPT, IGNORE_INDEX
from lmpipe.train.data import mask_for_mlm

# Why each causal measurement is not made for a masked LM (shown in the report and kept in the results).
SKIPPED = {
    "lm": "a masked LM sees the tokens after each position, so its next-token loss, perplexity and bits per "
          "byte would be scored with the answer in view; masked-token loss, accuracy and pseudo-perplexity "
          "replace them",
    "speed": "a masked LM does not decode left to right, so there is no generation speed to time",
    "samples": "a masked LM does not generate text",
}


def masking_of(config: dict[str, Any], directory: Path) -> dict[str, Any]:
    """The masking a masked LM was pretrained with (``mask_for_mlm``'s keyword arguments), from
    its config.json. Raises DataError when it is not recorded there."""
    spec = config.get("mlm")
    if not isinstance(spec, dict) or not {"mask_id", "probability"} <= set(spec):
        raise DataError("config.json of a masked LM records no 'mlm' masking (mask_id, probability): re-run "
                        "pretrain to write it", path=str(directory))
    return {"mask_id": int(spec["mask_id"]), "vocab_size": int(config["model"]["vocab_size"]),
            "probability": float(spec["probability"]),
            "special_ids": tuple(int(i) for i in spec.get("special_ids", ()))}


def spans(n_tokens: int, block: int) -> list[tuple[int, int]]:
    """(start, end) of the non-overlapping windows of the stream; windows of one token are dropped."""
    return [(start, min(start + block, n_tokens)) for start in range(0, n_tokens, block)
            if min(start + block, n_tokens) - start > 1]


def equal_length_batches(windows: list[tuple[int, int]], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``windows`` in batches of at most ``batch_size`` windows of one length (only the
    last window may be shorter, so it gets a batch of its own): no padding to mask."""
    batch: list[int] = []
    for i, (start, end) in enumerate(windows):
        if batch and (len(batch) == batch_size or end - start != windows[batch[0]][1] - windows[batch[0]][0]):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.no_grad()
def masked_scores(model: GPT, tokens: np.ndarray, masking: dict[str, Any], settings: MaskedLMSettings, *,
                  batch_size: int = 16, device: torch.device | str = "cpu", precision: str = "auto") -> dict[str, float]:
    """Masked-token loss (nats), accuracy, and with ``settings.pseudo_perplexity_windows`` the
    pseudo-perplexity of ``model`` on the token stream. Raises DataError when nothing can be masked."""
    device = torch.device(device)
    windows = spans(len(tokens), model.config.block_size)
    if not windows:
        raise DataError(f"{len(tokens)} tokens: nothing to score (need at least 2)")
    nats = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    model.eval()
    with autocast_for(device, precision):
        for batch in equal_length_batches(windows, batch_size):
            rows = [mask_for_mlm(torch.from_numpy(tokens[windows[i][0]:windows[i][1]].astype(np.int64)),
                                 np.random.default_rng([settings.seed, i]), **masking) for i in batch]
            inputs = torch.stack([r[0] for r in rows]).to(device)
            targets = torch.stack([r[1] for r in rows]).to(device)
            logits, _ = model(inputs)
            selected = targets != IGNORE_INDEX
            picked, wanted = logits.float()[selected], targets[selected]
            nats += F.cross_entropy(picked, wanted, reduction="sum").double()
            correct += (picked.argmax(-1) == wanted).sum()
            count += int(selected.sum())
    if count == 0:
        raise DataError(f"{len(tokens)} tokens: no position was masked (mask rate {masking['probability']})")
    loss = float(nats) / count
    out = {"masked_loss": loss, "masked_accuracy": int(correct) / count, "masked_tokens": float(count),
           "mask_rate": masking["probability"]}
    if settings.pseudo_perplexity_windows:
        out.update(pseudo_perplexity(model, tokens, windows, masking, settings.pseudo_perplexity_windows,
                                     batch_size, device, precision))
    return out


@torch.no_grad()
def pseudo_perplexity(model: GPT, tokens: np.ndarray, windows: list[tuple[int, int]], masking: dict[str, Any],
                      n_windows: int, batch_size: int, device: torch.device, precision: str) -> dict[str, float]:
    """Pseudo-perplexity on ``n_windows`` evenly spaced windows: every non-special position masked
    in turn (one copy of the window per position, ``batch_size`` copies per forward pass)."""
    picked = np.unique(np.linspace(0, len(windows) - 1, num=min(n_windows, len(windows))).round().astype(np.int64))
    specials = torch.tensor(masking["special_ids"], dtype=torch.long)
    nats, count = 0.0, 0
    with autocast_for(device, precision):
        for w in picked:
            start, end = windows[int(w)]
            window = torch.from_numpy(tokens[start:end].astype(np.int64))
            positions = torch.nonzero(~torch.isin(window, specials)).flatten()
            for first in range(0, len(positions), batch_size):
                where = positions[first:first + batch_size]
                copies = window.repeat(len(where), 1)
                copies[torch.arange(len(where)), where] = masking["mask_id"]
                logits, _ = model(copies.to(device))
                rows = torch.arange(len(where), device=device)
                logp = logits.float()[rows, where.to(device)].log_softmax(-1)
                nats -= float(logp[rows, window[where].to(device)].double().sum())
                count += len(where)
    if count == 0:
        return {}
    return {"pseudo_perplexity": math.exp(min(nats / count, 50.0)), "pseudo_loss": nats / count,
            "pseudo_tokens": float(count), "pseudo_windows": float(len(picked))}
