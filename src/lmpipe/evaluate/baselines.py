"""Baselines next to the fine-tuned scores: was fine-tuning worth it?

Per classification task, on the same rows the fine-tuned classifiers are scored on:

- ``majority``: always the most frequent training label;
- ``bag_of_words``: TF-IDF over word 1-2-grams and logistic regression (scikit-learn), fitted on the
  task's train split: what a practitioner tries first;
- ``zero_shot`` / ``few_shot_<k>``: the base model prompted with k labelled training examples
  (drawn with a fixed seed, a new draw per scored row, as lm-evaluation-harness does); the
  prediction is the label whose word has the highest log-likelihood after the prompt.

Per instruction task, the reference answers' loss (nats per token) and bits per byte under the
prompt: the prompted base model with k examples, and the fine-tuned model under its chat template
(the same answer tokens, so the numbers compare).

Prompts are laid out in token ids: ``<eos>``, then each example (template with its text, a space
and its answer) and a blank line, then the query. The model's context is short (128 tokens by
default), so each in-context example's text is cut to an equal share of the room the query
leaves (text first, then its answer); ``shots_used`` says how many examples fitted on average (each
needs room for at least ``2 * MIN_SHOT_TOKENS`` tokens).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmpipe.config import Paths
from lmpipe.evaluate.config import BaselineSettings, ClassificationEval, EvaluateConfig, InstructionEval
from lmpipe.evaluate.lm import check_model_tokenizer, load_checked
from lmpipe.model.gpt import GPT, IGNORE_INDEX
from lmpipe.model.io import is_masked_lm

log = logging.getLogger(__name__)

MIN_SHOT_TOKENS = 8  # an in-context example cut shorter than this shows no more than the format
SEPARATOR = "\n\n"


class PromptBuilder:
    """Token ids of k-shot prompts for one template with one placeholder (``{text}`` or ``{user}``)."""

    def __init__(self, sp: Any, eos_id: int, template: str, placeholder: str, block_size: int) -> None:
        before, after = template.split("{" + placeholder + "}")
        self.sp, self.eos_id, self.block_size = sp, eos_id, block_size
        self.before, self.after = self.encode(before), self.encode(after)
        self.separator = self.encode(SEPARATOR)

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text)) if text else []

    def build(self, query: str, shots: Sequence[tuple[str, str]], longest_answer: int) -> tuple[list[int], int]:
        """(context ids, examples that fitted) for ``query`` after the (text, answer) ``shots``;
        ``longest_answer`` tokens are kept free for the scored continuation."""
        room = self.block_size - longest_answer - 1  # the model sees at most block_size ids, minus the last
        frame = len(self.before) + len(self.after)
        query_ids = self.encode(query)[: max(1, room - 1 - frame)]
        context = [*self.before, *query_ids, *self.after]
        left = room - 1 - len(context)
        encoded = [(self.encode(text), self.encode(answer)) for text, answer in shots]
        used = len(encoded)
        while used and left // used - frame - len(self.separator) < 2 * MIN_SHOT_TOKENS:
            used -= 1
        prefix: list[int] = []
        for text, answer in encoded[:used]:
            budget = left // used - frame - len(self.separator)  # text first, the answer gets what is left
            text_n = min(len(text), max(MIN_SHOT_TOKENS, budget - len(answer)))
            prefix += [*self.before, *text[:text_n], *self.after, *answer[:budget - text_n], *self.separator]
        return [self.eos_id, *prefix, *context], used


@torch.no_grad()
def continuation_nats(model: GPT, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int,
                      device: torch.device) -> np.ndarray:
    """Negative log-likelihood in nats of each continuation given its context (summed over its
    tokens), batched by length. Each context + continuation must fit the model's block_size + 1."""
    out = np.zeros(len(pairs), dtype=np.float64)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    model.eval()
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        width = max(len(pairs[i][0]) + len(pairs[i][1]) for i in rows) - 1
        idx = torch.zeros((len(rows), width), dtype=torch.long)
        target = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(rows):
            context, continuation = pairs[i]
            sequence = torch.tensor([*context, *continuation], dtype=torch.long)
            idx[row, :len(sequence) - 1] = sequence[:-1]
            target[row, len(context) - 1:len(sequence) - 1] = sequence[len(context):]
        logits, _ = model(idx.to(device))
        nats = F.cross_entropy(logits.float().transpose(1, 2), target.to(device), ignore_index=IGNORE_INDEX,
                               reduction="none").sum(dim=1)
        out[rows] = nats.double().cpu().numpy()
    return out


def draws(pool_size: int, k: int, count: int, seed: int) -> list[list[int]]:
    """``count`` draws of ``k`` distinct indices into the pool (fixed seed, one draw per row)."""
    rng = random.Random(seed)
    return [rng.sample(range(pool_size), min(k, pool_size)) for _ in range(count)]


def shot_name(k: int) -> str:
    return "zero_shot" if k == 0 else f"few_shot_{k}"


def classification_baselines(name: str, spec: ClassificationEval, settings: BaselineSettings, paths: Paths,
                             sp: Any, info: Any, device: torch.device, prompted: bool = True) -> dict[str, dict[str, Any]]:
    """Majority, bag-of-words and (``prompted``) prompted scores of a classification task (method ->
    scores with accuracy, macro F1, precision, recall and the confusion matrix)."""
    from lmpipe.train.finetune import classify

    train = classify.read_labelled(spec.train_data, paths)
    rows = classify.read_labelled(spec.data, paths)
    labels = classify.resolve_labels(train, None)
    train_ids, actual = classify.label_ids(train, labels), classify.label_ids(rows, labels)

    def scored(predicted: np.ndarray, **extra: Any) -> dict[str, Any]:
        confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
        np.add.at(confusion, (actual[:len(predicted)], predicted), 1)
        return {**classify.classification_metrics(confusion, labels)["overall"], "examples": len(predicted),
                "confusion": confusion.tolist(), "labels": labels, **extra}

    majority = int(np.bincount(train_ids, minlength=len(labels)).argmax())
    out = {"majority": scored(np.full(len(rows), majority), label=labels[majority]),
           "bag_of_words": scored(bag_of_words([t.text for t in train], train_ids, [r.text for r in rows]))}
    if not prompted:
        return out
    model, _ = load_checked(paths.root / settings.model, info.fingerprint, device)
    words = [spec.label_words.get(label, label) for label in labels]
    builder = PromptBuilder(sp, info.eos_id, spec.prompt, spec.placeholder, model.config.block_size)
    answers = [builder.encode(w) for w in words]  # sentencepiece's word-start piece: the word after a space
    queries = rows[:settings.max_examples]
    for k in settings.shots:
        pairs, used = [], []
        for query, picks in zip(queries, draws(len(train), k, len(queries), settings.seed), strict=True):
            shots = [(train[i].text, words[train_ids[i]]) for i in picks]
            context, n = builder.build(query.text, shots, max(map(len, answers)))
            pairs += [(context, answer) for answer in answers]
            used.append(n)
        nats = continuation_nats(model, pairs, settings.batch_size, device).reshape(len(queries), len(labels))
        out[shot_name(k)] = scored(nats.argmin(axis=1), shots=k, shots_used=float(np.mean(used)))
    for method, result in out.items():
        log.info("baseline %s / %s: accuracy %.4f, macro F1 %.4f", name, method, result["accuracy"],
                 result["macro_f1"])
    return out


def bag_of_words(train_texts: list[str], train_labels: np.ndarray, texts: list[str]) -> np.ndarray:
    """Labels predicted by TF-IDF (word 1-2-grams, sublinear tf) + logistic regression fitted on train."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    classifier = LogisticRegression(max_iter=1000)
    classifier.fit(vectorizer.fit_transform(train_texts), train_labels)
    return np.asarray(classifier.predict(vectorizer.transform(texts)), dtype=np.int64)


def answer_scores(nats: np.ndarray, tokens: Sequence[int], references: Sequence[str], **extra: Any) -> dict[str, Any]:
    """Loss per answer token, perplexity and bits per byte of the scored answers from their nats."""
    loss = float(nats.sum()) / max(sum(tokens), 1)
    n_bytes = sum(len(r.encode("utf-8")) for r in references)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bpb": float(nats.sum()) / math.log(2) / n_bytes,
            "examples": len(references), **extra}


def instruction_baselines(name: str, spec: InstructionEval, settings: BaselineSettings, paths: Paths, sp: Any,
                          info: Any, device: torch.device, prompted: bool = True) -> dict[str, dict[str, Any]]:
    """The reference answers' loss and bits per byte under the prompted base model (k shots; with
    ``prompted``) and under the fine-tuned model's chat template (``finetuned``)."""
    from lmpipe.train.finetune import sft

    count = min(spec.max_examples, settings.max_examples or spec.max_examples)
    held_out = sft.held_out_prompts(sft.read_conversations(spec.data, paths, spec.system_prompt), count)
    train = sft.held_out_prompts(sft.read_conversations(spec.train_data, paths), 10**9)
    examples = [(last_user(prompt), reference) for prompt, reference in held_out]
    pool = [(last_user(prompt), reference) for prompt, reference in train]
    out: dict[str, dict[str, Any]] = {}
    model, _ = load_checked(paths.root / settings.model, info.fingerprint, device)
    builder = PromptBuilder(sp, info.eos_id, spec.prompt, spec.placeholder, model.config.block_size)
    # The same answer tokens under every model; a long answer is cut to half the context, and its
    # bits per byte count the bytes of what is scored.
    answers = [builder.encode(reference)[: model.config.block_size // 2] for _, reference in held_out]
    scored = [str(sp.decode(answer)) for answer in answers]
    for k in settings.shots if prompted else []:
        pairs, used = [], []
        for (user, _), answer, picks in zip(examples, answers, draws(len(pool), k, len(examples), settings.seed),
                                            strict=True):
            context, n = builder.build(user, [pool[i] for i in picks], len(answer))
            pairs.append((context, answer))
            used.append(n)
        out[shot_name(k)] = answer_scores(*_nats(model, pairs, settings, device), scored, shots=k,
                                          shots_used=float(np.mean(used)))
    del model
    tuned, _ = load_checked(paths.root / spec.model, info.fingerprint, device)
    template = sft.ChatTemplate.from_tokenizer(sp, info)
    pairs = [(template.prompt(prompt)[-(tuned.config.block_size - len(answer) + 1):], answer)
             for (prompt, _), answer in zip(held_out, answers, strict=True)]
    out["finetuned"] = answer_scores(*_nats(tuned, pairs, settings, device), scored)
    for method, result in out.items():
        log.info("baseline %s / %s: answer loss %.4f, bits/byte %.4f", name, method, result["loss"], result["bpb"])
    return out


def _nats(model: GPT, pairs: list[tuple[list[int], list[int]]], settings: BaselineSettings,
          device: torch.device) -> tuple[np.ndarray, list[int]]:
    return continuation_nats(model, pairs, settings.batch_size, device), [len(a) for _, a in pairs]


def last_user(messages: Sequence[Any]) -> str:
    return next(m.content for m in reversed(messages) if m.role == "user")


def baseline_tables(cfg: EvaluateConfig, paths: Paths, sp: Any, info: Any, device: torch.device,
                    results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One table per scored task: the baselines' rows, then each fine-tuned model's, and which
    fine-tuned models lose to which baseline (``loses_to``) on the task's key metric."""
    tables: dict[str, dict[str, Any]] = {}
    # A masked-LM base model has no left-to-right likelihood to prompt: only the other baselines run.
    base_dir = paths.root / cfg.baselines.model
    prompted = not is_masked_lm(check_model_tokenizer(base_dir, info.fingerprint))
    for name, by_model in results.get("classification", {}).items():
        rows = classification_baselines(name, cfg.classification[name], cfg.baselines, paths, sp, info, device,
                                        prompted)
        rows.update({model: {k: r[k] for k in (*CLASSIFICATION_KEYS, "examples")} for model, r in by_model.items()})
        tables[name] = {"type": "classification", "metric": "accuracy", "finetuned": list(by_model), "rows": rows}
    for name, result in results.get("instruction", {}).items():
        rows = instruction_baselines(name, cfg.instruction[name], cfg.baselines, paths, sp, info, device, prompted)
        rows["finetuned"]["exact_match"] = result["exact_match"]  # of its greedy answers (tasks.instruction_scores)
        tables[name] = {"type": "instruction", "metric": "bpb", "finetuned": ["finetuned"], "rows": rows}
    for table in tables.values():
        table["loses_to"] = loses_to(table)
        if not prompted:
            table["prompted_skipped"] = (f"the base model {cfg.baselines.model} is a masked LM: it has no "
                                         "left-to-right likelihood of a label word or an answer to prompt")
    return tables


def loses_to(table: dict[str, Any]) -> list[list[str]]:
    """[fine-tuned model, baseline] for each baseline that scores strictly better on the table's
    metric (higher accuracy; lower bits per byte)."""
    key, rows, tuned = table["metric"], table["rows"], table["finetuned"]
    sign = -1.0 if key == "bpb" else 1.0
    return [[model, baseline] for model in tuned for baseline, row in rows.items()
            if baseline not in tuned and key in row and sign * (row[key] - rows[model][key]) > 0]


CLASSIFICATION_KEYS = ("accuracy", "macro_f1", "macro_precision", "macro_recall")


def numeric(tables: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Task -> method -> its numbers, for metrics/evaluate.json."""
    keep = (*CLASSIFICATION_KEYS, "loss", "bpb", "exact_match", "shots_used")
    return {task: {method: {k: v for k, v in row.items() if k in keep} for method, row in table["rows"].items()}
            for task, table in tables.items()}
