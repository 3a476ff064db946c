"""Task quality: classification accuracy / F1, token classification entity F1, instruction answers
scored with BLEU and ROUGE-L, and sample generations for fixed prompts.

- Classification reuses the finetune stage's reading, encoding and metrics
  (:mod:`lmpipe.train.finetune.classify`), so a classifier is scored exactly as it was selected.
- Token classification reuses the finetune stage's reading, word alignment and seqeval scores
  (:mod:`lmpipe.train.finetune.tagging`), next to the most-frequent-tag-per-word baseline.
- BLEU is sacrebleu's corpus BLEU (Post 2018, "A Call for Clarity in Reporting BLEU Scores"): its
  13a tokenisation, or its ``zh`` tokenisation (each Chinese character a token, 13a for the rest,
  as WMT scores Chinese) when references are Chinese; the signature says which.
- ROUGE-L (Lin 2004) is Google's ``rouge-score`` (the reference Python implementation of ROUGE
  1.5.5), F1 of the longest common subsequence averaged over examples, with its tokenisation
  (lower case, runs of a-z and 0-9) extended so that every CJK character is a token: Chinese has
  no spaces, and without this an answer in Chinese would be a single token or none.
- Instruction scores are also given per reference language (``zh`` for references with Chinese
  characters, ``other`` for the rest), each with its BLEU tokenisation.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
import torch
from rouge_score import rouge_scorer, tokenizers

from lmpipe.config import Paths
from lmpipe.evaluate.config import ClassificationEval, InstructionEval, TokenClassificationEval
from lmpipe.evaluate.lm import check_model_tokenizer, load_checked
from lmpipe.model.gpt import GPT

log = logging.getLogger(__name__)

EXAMPLES_SHOWN = 5  # instruction answers kept for the report
# CJK ideographs (with extensions and compatibility forms), kana and Hangul syllables
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002fa1f"
_TOKEN = re.compile(f"[{_CJK}]|[a-z0-9]+")
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")


class CJKTokenizer(tokenizers.Tokenizer):
    """rouge-score's default tokenisation (lower-cased runs of a-z and 0-9; no stemming), plus every
    CJK character as a token of its own. On text without CJK it gives the default's tokens."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower())


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CJKTokenizer())


def rouge_l(hypothesis: str, reference: str) -> dict[str, float]:
    """ROUGE-L precision, recall and F1 of one hypothesis against one reference (rouge-score)."""
    score = _ROUGE.score(reference, hypothesis)["rougeL"]
    return {"precision": float(score.precision), "recall": float(score.recall), "f1": float(score.fmeasure)}


def is_chinese(text: str, min_share: float = 0.2) -> bool:
    """Whether at least ``min_share`` of the non-space characters are Chinese ideographs."""
    chars = len(text) - sum(c.isspace() for c in text)
    return chars > 0 and len(_HAN.findall(text)) >= min_share * chars


def bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """sacrebleu corpus BLEU (0-100) of the hypotheses against one reference each, and its signature.

    Tokenisation: ``zh`` when any reference is Chinese (:func:`is_chinese`), else ``13a``."""
    import sacrebleu

    metric = sacrebleu.BLEU(tokenize="zh" if any(map(is_chinese, references)) else "13a")
    score = metric.corpus_score(hypotheses, [references])
    return float(score.score), str(metric.get_signature())


def text_scores(answers: list[str], references: list[str]) -> dict[str, Any]:
    """BLEU, mean ROUGE-L F1 and exact-match rate of answers against references, overall and per
    reference language (``by_language``: ``zh`` and ``other``, where both occur)."""
    rouge = [rouge_l(a, r)["f1"] for a, r in zip(answers, references, strict=True)]
    exact = [a.strip().lower() == r.strip().lower() for a, r in zip(answers, references, strict=True)]
    score, signature = bleu(answers, references)
    out: dict[str, Any] = {"bleu": score, "rouge_l": float(np.mean(rouge)), "exact_match": float(np.mean(exact)),
                           "examples": len(answers), "bleu_signature": signature, "rouge_l_each": rouge}
    chinese = np.array([is_chinese(r) for r in references], np.bool_)
    if chinese.any() and not chinese.all():
        out["by_language"] = {}
        for name, rows in (("zh", np.flatnonzero(chinese)), ("other", np.flatnonzero(~chinese))):
            part_bleu, part_signature = bleu([answers[i] for i in rows], [references[i] for i in rows])
            out["by_language"][name] = {"bleu": part_bleu, "rouge_l": float(np.mean([rouge[i] for i in rows])),
                                        "exact_match": float(np.mean([exact[i] for i in rows])),
                                        "examples": len(rows), "bleu_signature": part_signature}
    return out


def classification_scores(name: str, spec: ClassificationEval, paths: Paths, sp: Any, info: Any,
                          device: torch.device) -> dict[str, dict[str, Any]]:
    """Accuracy, macro precision/recall/F1, per-class scores and the confusion matrix of each
    classifier of a task on its data. Raises FingerprintMismatch / DataError for bad models or rows."""
    from lmpipe.model.classifier import load_classifier
    from lmpipe.train.finetune import classify
    from lmpipe.train.finetune.data import eval_batches

    items = classify.read_labelled(spec.data, paths)
    results: dict[str, dict[str, Any]] = {}
    for model_name, directory in spec.models.items():
        model_dir = paths.root / directory
        check_model_tokenizer(model_dir, info.fingerprint)
        model, labels, _ = load_classifier(model_dir, device)
        encoder = classify.TextEncoder(sp, info.eos_id, model.backbone.config.block_size)
        examples = classify.build_examples(items, labels, encoder)
        batches = eval_batches(examples, classify.ClassCollate(info.pad_id), spec.batch_size)
        predicted = classify.predict(model, batches, device)
        actual = np.array([e.label for e in examples])
        confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
        np.add.at(confusion, (actual, predicted), 1)
        report = classify.classification_metrics(confusion, labels)
        results[model_name] = {**report["overall"], "examples": len(examples), "per_class": report["per_class"],
                               "confusion": confusion.tolist(), "labels": labels}
        log.info("classification %s / %s: accuracy %.4f, macro F1 %.4f on %d examples", name, model_name,
                 report["overall"]["accuracy"], report["overall"]["macro_f1"], len(examples))
    return results


def token_classification_scores(name: str, spec: TokenClassificationEval, paths: Paths, sp: Any, info: Any,
                                device: torch.device) -> dict[str, Any]:
    """Entity-level precision/recall/F1 and the per-entity table (seqeval) of each token classifier
    of a task, and of the baseline tagging each word with its most frequent training tag.
    Raises FingerprintMismatch / DataError for bad models or rows."""
    from lmpipe.model.classifier import load_token_classifier
    from lmpipe.train.finetune import tagging

    items = tagging.read_tagged(spec.data, paths, spec.strict)
    gold = [item.tags for item in items]
    majority = tagging.majority_tagger(tagging.read_tagged(spec.train_data, paths, spec.strict))
    baseline = tagging.entity_scores(gold, tagging.tag_with(majority, items))
    models: dict[str, Any] = {}
    for model_name, directory in spec.models.items():
        model_dir = paths.root / directory
        check_model_tokenizer(model_dir, info.fingerprint)
        model, labels, config = load_token_classifier(model_dir, device)
        max_length = (config.get("finetune") or {}).get("max_length") or model.backbone.config.block_size
        examples = tagging.build_examples(items, labels, tagging.WordEncoder(
            sp, info.eos_id, max_length, config["classifier"].get("label_piece", "first")))
        report = tagging.score_tagger(model, items, examples, labels, info.pad_id, spec.batch_size, device)
        models[model_name] = {**report["overall"], "examples": len(items), "per_entity": report["per_entity"],
                              "path": directory}
        log.info("token classification %s / %s: entity F1 %.4f (precision %.4f, recall %.4f) on %d sentences", name,
                 model_name, report["overall"]["f1"], report["overall"]["precision"], report["overall"]["recall"],
                 len(items))
    return {"models": models, "majority": {**baseline["overall"], "examples": len(items),
                                           "per_entity": baseline["per_entity"]}}


def instruction_scores(name: str, spec: InstructionEval, paths: Paths, sp: Any, info: Any,
                       device: torch.device) -> dict[str, Any]:
    """Greedy answers of the instruction model to held-out prompts, scored against the references:
    corpus BLEU, mean ROUGE-L F1, exact-match rate, and the first few examples."""
    from lmpipe.train.finetune import sft

    model, _ = load_checked(paths.root / spec.model, info.fingerprint, device)
    template = sft.ChatTemplate.from_tokenizer(sp, info)
    conversations = sft.read_conversations(spec.data, paths, spec.system_prompt)
    prompts = sft.held_out_prompts(conversations, spec.max_examples)
    answers = [sft.generate_reply(model, template, prompt, spec.max_new_tokens, device) for prompt, _ in prompts]
    references = [reference for _, reference in prompts]
    scores = text_scores(answers, references)
    rouge = scores.pop("rouge_l_each")
    score = scores["bleu"]
    result = {
        **scores,
        "samples": [{"prompt": "\n".join(f"{m.role}: {m.content}" for m in prompt), "reference": reference,
                     "generated": answer, "rouge_l": r}
                    for (prompt, reference), answer, r in list(zip(prompts, answers, rouge, strict=True))[:EXAMPLES_SHOWN]],
    }
    log.info("instruction %s: BLEU %.2f, ROUGE-L %.4f, exact %.3f on %d prompts", name, score, result["rouge_l"],
             result["exact_match"], len(answers))
    return result


@torch.no_grad()
def sample_generations(model: GPT, sp: Any, eos_id: int, prompts: list[str], max_new_tokens: int,
                       temperature: float, seed: int, device: torch.device) -> list[dict[str, str]]:
    """Continuations of fixed prompts (greedy at temperature 0), each stopped at EOS."""
    out = []
    generator = torch.Generator(device=device).manual_seed(seed)
    for prompt in prompts:
        ids = [eos_id, *sp.encode(prompt)] if prompt else [eos_id]
        ids = ids[-(model.config.block_size - 1):]
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        result = model.generate(idx, max_new_tokens, temperature=temperature, top_k=50 if temperature > 0 else None,
                                stop_tokens=[eos_id], generator=generator)
        new = result[0, len(ids):].tolist()
        if eos_id in new:
            new = new[:new.index(eos_id)]
        out.append({"prompt": prompt, "continuation": sp.decode(new)})
    return out

