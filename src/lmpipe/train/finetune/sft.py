"""Instruction tuning (SFT): chat template, prompt-masked examples, batches, loss and generation.

Template (token ids; role markers are the tokenizer's special tokens, one id each)::

    <|endoftext|> [<|system|> system <|end|>] <|user|> question <|end|> <|assistant|> answer <|end|> ...

The leading EOS is the document separator of the token shards, so a conversation starts the way
every pretraining document did. Loss is taken only on the tokens the assistant writes: each
assistant turn's content and its closing ``<|end|>`` (so the model learns to stop); every other
target is -100 (``IGNORE_INDEX``) and contributes neither loss nor gradient. At inference the
prompt ends with ``<|assistant|>`` and generation stops at ``<|end|>`` or EOS.

Batches are right-padded with the pad id and -100 targets rather than packed: the model is causal,
so a real token never attends to the padding after it, and no attention mask or position reset is
needed (packing several conversations into one row would need a block-diagonal mask, which the
model's SDPA call does not take).
"""

from __future__ import annotations

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
from lmpipe.model.gpt import GPT, IGNORE_INDEX
from lmpipe.train.finetune.config import DataSource
from lmpipe.train.finetune.data import Batch, Row, describe_source, pad_rows, read_rows
from lmpipe.train.objectives import LanguageModelObjective

log = logging.getLogger(__name__)

ROLE_PIECES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_PIECE = "<|end|>"


@dataclass(frozen=True)
class Message:
    role: str
    content: str


class ChatTemplate:
    """Renders conversations to token ids with the tokenizer's role tokens (see module docstring)."""

    def __init__(self, sp: spm.SentencePieceProcessor, *, eos_id: int, pad_id: int, role_ids: dict[str, int],
                 end_id: int) -> None:
        self.sp, self.eos_id, self.pad_id, self.role_ids, self.end_id = sp, eos_id, pad_id, role_ids, end_id

    @classmethod
    def from_tokenizer(cls, sp: spm.SentencePieceProcessor, info: Any) -> ChatTemplate:
        """Build from a loaded tokenizer and its :class:`~lmpipe.tokenizer.train.TokenizerInfo`.

        Raises DataError when the tokenizer lacks a role token (it must be a special token so
        that it is one id that text can never produce by accident).
        """
        special = dict(info.special_tokens)
        missing = [p for p in (*ROLE_PIECES.values(), END_PIECE) if p not in special]
        if missing:
            raise DataError(f"tokenizer has no special token(s) {', '.join(missing)}: add them to "
                            "tokenizer.special_tokens and re-run the tokenizer and later stages",
                            path=str(info.directory / "tokenizer.json"))
        return cls(sp, eos_id=info.eos_id, pad_id=info.pad_id,
                   role_ids={role: special[p] for role, p in ROLE_PIECES.items()}, end_id=special[END_PIECE])

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.sp.decode([int(i) for i in ids]))

    def render(self, messages: Sequence[Message]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, trained): token ids of the conversation and, per token, whether the model is
        trained to produce it (assistant content and its closing end token)."""
        ids, trained = [self.eos_id], [False]
        for message in messages:
            content = self.encode(message.content)
            ids += [self.role_ids[message.role], *content, self.end_id]
            answer = message.role == "assistant"
            trained += [False] + [answer] * (len(content) + 1)
        return np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool)

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        """Ids of ``messages`` followed by the assistant marker: what generation continues."""
        return [*self.render(messages)[0].tolist(), self.role_ids["assistant"]]

    def describe(self) -> dict[str, Any]:
        """The template as recorded in a fine-tuned model's config.json."""
        return {"layout": "<eos> (<|role|> content <|end|>)* <|assistant|>", "eos_id": self.eos_id,
                "pad_id": self.pad_id, "role_ids": dict(self.role_ids), "end_id": self.end_id,
                "role_pieces": dict(ROLE_PIECES), "end_piece": END_PIECE}


# ------------------------------------------------------------------------------------ reading


def conversation(row: Row, system_prompt: str | None) -> list[Message]:
    """The conversation of a row: its ``messages`` list, or instruction/input/output fields.

    Raises DataError naming the file and line/row for missing columns, empty texts, unknown
    roles, or a conversation without an assistant turn.
    """
    if row.has("messages"):
        raw = row.get("messages")
        if not isinstance(raw, list) or not raw:
            raise row.error(f"column '{row.column('messages')}' must be a non-empty list of {{role, content}}")
        messages = []
        for idx, item in enumerate(raw):
            if not isinstance(item, dict) or not isinstance(item.get("role"), str) \
                    or not isinstance(item.get("content"), str):
                raise row.error(f"messages[{idx}] must be an object with text 'role' and 'content'")
            if item["role"] not in ROLE_PIECES:
                raise row.error(f"messages[{idx}]: unknown role {item['role']!r} (roles: {', '.join(ROLE_PIECES)})")
            if not item["content"].strip():
                raise row.error(f"messages[{idx}]: content is empty")
            messages.append(Message(item["role"], item["content"]))
        if not any(m.role == "assistant" for m in messages):
            raise row.error("messages has no assistant turn to learn from")
    else:
        instruction = row.text("instruction")
        given = row.text("input", required=False, allow_empty=True)
        output = row.text("output")
        user = f"{instruction}\n\n{given}" if given.strip() else instruction
        messages = [Message("user", user), Message("assistant", output)]
    system = row.text("system", required=False, allow_empty=True) or system_prompt
    if system and messages[0].role != "system":
        messages.insert(0, Message("system", system))
    return messages


def read_conversations(source: DataSource, paths: Paths, system_prompt: str | None = None) -> list[list[Message]]:
    """Every conversation of a source (DataError on the first bad row, or when there is none)."""
    conversations = [conversation(row, system_prompt) for row in read_rows(source, paths)]
    if not conversations:
        raise DataError(f"no examples in {describe_source(source)}: the source is empty or no document has the "
                        "requested kind")
    return conversations


# ----------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class SFTExample:
    ids: np.ndarray  # (n,) int64 token ids of the conversation
    trained: np.ndarray  # (n,) bool: the model is trained to produce this token

    @property
    def inputs(self) -> np.ndarray:
        return self.ids[:-1]

    @property
    def targets(self) -> np.ndarray:
        """Next-token targets; -100 wherever the next token is not one the assistant writes."""
        return np.where(self.trained[1:], self.ids[1:], IGNORE_INDEX)


def build_examples(conversations: Sequence[Sequence[Message]], template: ChatTemplate,
                   max_length: int) -> tuple[list[SFTExample], dict[str, int]]:
    """Render and cut to ``max_length`` input tokens; drop examples left with no trained target.

    Returns the examples and counts (``truncated``, ``dropped``).
    """
    examples, truncated, dropped = [], 0, 0
    for messages in conversations:
        ids, trained = template.render(messages)
        if len(ids) > max_length + 1:
            ids, trained = ids[:max_length + 1], trained[:max_length + 1]
            truncated += 1
        if not trained[1:].any():
            dropped += 1
            continue
        examples.append(SFTExample(ids, trained))
    if dropped:
        log.warning("%d conversations have no answer token within max_length=%d and were dropped", dropped, max_length)
    return examples, {"truncated": truncated, "dropped": dropped}


def collate(examples: Sequence[SFTExample], pad_id: int) -> Batch:
    """Right-padded ``input`` (pad id) and ``target`` (-100) of shape (B, T), and ``length`` (B,)."""
    return {
        "input": pad_rows([e.inputs for e in examples], pad_id),
        "target": pad_rows([e.targets for e in examples], IGNORE_INDEX),
        "length": torch.tensor([len(e.inputs) for e in examples], dtype=torch.long),
    }


class SFTCollate:
    """Picklable collate function bound to a pad id."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[SFTExample]) -> Batch:
        return collate(examples, self.pad_id)


# ---------------------------------------------------------------------------------- objective


class SFTObjective(LanguageModelObjective):
    """Answer-token cross-entropy (the batch's targets are -100 outside answers); dev metrics are
    loss (nats/answer token), perplexity and next-token accuracy on answer tokens."""

    def __init__(self, monitor: str = "loss") -> None:
        self.monitor = monitor
        self.mode = "min" if monitor == "loss" else "max"
        self.sums_size = 3

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: Batch) -> Tensor:
        """[sum of answer-token losses, answer tokens, correctly predicted answer tokens]."""
        logits, _ = model(batch["input"])
        target = batch["target"]
        mask = target != IGNORE_INDEX
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        correct = ((logits.argmax(-1) == target) & mask).sum()
        return torch.stack([loss_sum, mask.sum().float(), correct.float()])

    def metrics(self, sums: Tensor) -> dict[str, float]:
        loss_sum, count, correct = sums.tolist()
        loss = loss_sum / max(count, 1.0)
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "token_accuracy": correct / max(count, 1.0)}


# --------------------------------------------------------------------------------- generation


@torch.no_grad()
def generate_reply(model: GPT, template: ChatTemplate, messages: Sequence[Message], max_new_tokens: int,
                   device: torch.device | str = "cpu") -> str:
    """Greedy answer of ``model`` to a conversation whose last turn is the user's."""
    prompt = template.prompt(messages)
    was_training = model.training
    model.eval()
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    out = model.generate(idx, max_new_tokens, temperature=0.0, stop_tokens=[template.end_id, template.eos_id])
    model.train(was_training)
    new = out[0, len(prompt):].tolist()
    for stop in (template.end_id, template.eos_id):
        if stop in new:
            new = new[:new.index(stop)]
    return template.decode(new)


def held_out_prompts(conversations: Sequence[Sequence[Message]], count: int) -> list[tuple[list[Message], str]]:
    """(prompt turns, reference answer) for the first ``count`` conversations: everything before
    the last assistant turn, and that turn's text."""
    out = []
    for messages in conversations[:count]:
        last = max(i for i, m in enumerate(messages) if m.role == "assistant")
        out.append((list(messages[:last]), messages[last].content))
    return out
