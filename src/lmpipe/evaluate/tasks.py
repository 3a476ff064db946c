"""Task quality: classification accuracy / F1, instruction answers scored with BLEU and ROUGE-L,
and sample generations for fixed prompts.

- Classification reuses the finetune stage's reading, encoding and metrics
  (:mod:`lmpipe.train.classify`), so a classifier is scored exactly as it was selected.
- BLEU is sacrebleu's corpus BLEU (Post 2018, "A Call for Clarity in Reporting BLEU Scores"): its
  13a tokenisation and signature make the number comparable across papers.
- ROUGE-L (Lin 2004) is the F1 of the longest common subsequence of lower-cased whitespace tokens,
  averaged over examples (the F1 variant that rouge-score reports), implemented here with the
  standard O(n m) dynamic programme.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from lmpipe.config import Paths
from lmpipe.evaluate.config import ClassificationEval, InstructionEval
from lmpipe.evaluate.lm import check_model_tokenizer, load_checked
from lmpipe.model.gpt import GPT

log = logging.getLogger(__name__)

EXAMPLES_SHOWN = 5  # instruction answers kept for the report


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (one-row dynamic programme)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for token in a:
        diagonal = 0
        for j, other in enumerate(b, start=1):
            keep = row[j]
            row[j] = diagonal + 1 if token == other else max(row[j], row[j - 1])
            diagonal = keep
    return row[-1]


def rouge_l(hypothesis: str, reference: str) -> dict[str, float]:
    """ROUGE-L precision, recall and F1 of one hypothesis against one reference."""
    hyp, ref = hypothesis.lower().split(), reference.lower().split()
    if not hyp or not ref:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    lcs = lcs_length(hyp, ref)
    precision, recall = lcs / len(hyp), lcs / len(ref)
    f1 = 2 * precision * recall / (precision + recall) if lcs else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """sacrebleu corpus BLEU (0-100) of the hypotheses against one reference each, and its signature."""
    import sacrebleu

    metric = sacrebleu.BLEU()
    score = metric.corpus_score(hypotheses, [references])
    return float(score.score), str(metric.get_signature())


def classification_scores(name: str, spec: ClassificationEval, paths: Paths, sp: Any, info: Any,
                          device: torch.device) -> dict[str, dict[str, Any]]:
    """Accuracy, macro precision/recall/F1, per-class scores and the confusion matrix of each
    classifier of a task on its data. Raises FingerprintMismatch / DataError for bad models or rows."""
    from lmpipe.train import classify
    from lmpipe.train.finetune_data import eval_batches

    items = classify.read_labelled(spec.data, paths)
    results: dict[str, dict[str, Any]] = {}
    for model_name, directory in spec.models.items():
        model_dir = paths.root / directory
        check_model_tokenizer(model_dir, info.fingerprint)
        model, labels, _ = classify.load_classifier(model_dir, device)
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


def instruction_scores(name: str, spec: InstructionEval, paths: Paths, sp: Any, info: Any,
                       device: torch.device) -> dict[str, Any]:
    """Greedy answers of the instruction model to held-out prompts, scored against the references:
    corpus BLEU, mean ROUGE-L F1, exact-match rate, and the first few examples."""
    from lmpipe.train import sft

    model, _ = load_checked(paths.root / spec.model, info.fingerprint, device)
    template = sft.ChatTemplate.from_tokenizer(sp, info)
    conversations = sft.read_conversations(spec.data, paths, spec.system_prompt)
    prompts = sft.held_out_prompts(conversations, spec.max_examples)
    answers = [sft.generate_reply(model, template, prompt, spec.max_new_tokens, device) for prompt, _ in prompts]
    references = [reference for _, reference in prompts]
    score, signature = bleu(answers, references)
    rouge = [rouge_l(a, r) for a, r in zip(answers, references, strict=True)]
    exact = [a.strip().lower() == r.strip().lower() for a, r in zip(answers, references, strict=True)]
    result = {
        "bleu": score, "rouge_l": float(np.mean([r["f1"] for r in rouge])), "exact_match": float(np.mean(exact)),
        "examples": len(answers), "bleu_signature": signature,
        "samples": [{"prompt": "\n".join(f"{m.role}: {m.content}" for m in prompt), "reference": reference,
                     "generated": answer, "rouge_l": r["f1"]}
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

