"""Knowledge-distillation losses and the teacher's targets: soft-target KL with temperature,
reverse KL, hard-label cross-entropy and hidden-state matching, for token logits (B, T, V) and
class logits (B, C) alike; and the teacher's top-k targets precomputed once to disk.

The teacher's soft targets come either as full logits (teacher run online) or as
:class:`TopKTargets`: the teacher's ``k`` largest log-probabilities at temperature T and their
ids, as precomputed to disk. A top-k distribution is completed with one "other" bucket holding
the remaining mass 1 - sum(p_k); the student's distribution is bucketed the same way (its mass
outside the teacher's top-k ids), so the KL is exact over the top-k ids plus one tail term. By
the log-sum inequality the tail term never exceeds the exact tail sum, and it equals it when the
student spreads its tail like the teacher; with a peaked teacher the tail mass, and so the error,
is small. ``k`` log-probabilities in fp16 and ids per position are what makes a cache of the
teacher affordable: k = 32 is 128 bytes per token instead of 2 * V bytes.

Every loss is computed in fp32 (``.float()``): softmax over a vocabulary in bf16 loses the small
probabilities the soft targets exist to transfer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from lmpipe.errors import DataError
from lmpipe.io import MANIFEST_NAME, atomic_dir, read_manifest, write_manifest
from lmpipe.model.gpt import GPT, IGNORE_INDEX
from lmpipe.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class TopKTargets:
    """The teacher's top-k log-probabilities at temperature T (..., k) and their ids (..., k)."""

    logp: Tensor
    indices: Tensor


Teacher = Tensor | TopKTargets


def teacher_topk(teacher_logits: Tensor, k: int, temperature: float) -> TopKTargets:
    """The top ``k`` log-probabilities of ``softmax(teacher_logits / T)`` and their ids."""
    logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return TopKTargets(values, indices)


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is true (all positions without a mask)."""
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


LOG_FLOOR = -30.0  # log of an "empty" bucket: keeps 0 * log 0 terms finite (e^-30 ~ 1e-13)


def _bucket(student_logp: Tensor, teacher: TopKTargets) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(teacher log p over the top-k ids, teacher tail mass, student log q over the same ids,
    student log tail mass): both distributions over k + 1 outcomes."""
    t_logp = teacher.logp.float()
    s_logq = student_logp.gather(-1, teacher.indices)
    # The student's mass outside the teacher's top-k: logsumexp with the top-k ids masked out.
    s_tail = student_logp.scatter(-1, teacher.indices, float("-inf")).logsumexp(-1).clamp_min(LOG_FLOOR)
    t_tail = (1.0 - t_logp.exp().sum(-1)).clamp_min(0.0)  # fp16 storage may push the sum a hair past 1
    return t_logp, t_tail, s_logq, s_tail


def forward_kl_per_position(student_logits: Tensor, teacher: Teacher, temperature: float) -> Tensor:
    """KL(p_teacher || q_student) at temperature T for every position (no T^2 factor)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, TopKTargets):
        t_logp, t_tail, s_logq, s_tail = _bucket(s, teacher)
        return (t_logp.exp() * (t_logp - s_logq)).sum(-1) + torch.xlogy(t_tail, t_tail) - t_tail * s_tail
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def reverse_kl_per_position(student_logits: Tensor, teacher: Teacher, temperature: float) -> Tensor:
    """KL(q_student || p_teacher) at temperature T for every position (no T^2 factor)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, TopKTargets):
        t_logp, t_tail, s_logq, s_tail = _bucket(s, teacher)
        log_t_tail = t_tail.clamp_min(math.exp(LOG_FLOOR)).log()
        return (s_logq.exp() * (s_logq - t_logp)).sum(-1) + s_tail.exp() * (s_tail - log_t_tail)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (s.exp() * (s - t)).sum(-1)


def soft_kl(student_logits: Tensor, teacher: Teacher, temperature: float, mask: Tensor | None = None) -> Tensor:
    """Hinton et al. 2015: KL between the teacher's and student's softmax at temperature T, times
    T^2. The gradient of the soft term scales as 1/T^2 (sec. 2), so multiplying by T^2 keeps its
    weight relative to the hard term unchanged when T is tuned."""
    return masked_mean(forward_kl_per_position(student_logits, teacher, temperature), mask) * temperature ** 2


def reverse_kl(student_logits: Tensor, teacher: Teacher, temperature: float, mask: Tensor | None = None) -> Tensor:
    """KL(student || teacher) at temperature T, times T^2 (same scaling as :func:`soft_kl`).
    Mode-seeking: the student is penalised for mass where the teacher has little (MiniLLM)."""
    return masked_mean(reverse_kl_per_position(student_logits, teacher, temperature), mask) * temperature ** 2


def hard_ce(student_logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy on the true labels / next tokens; targets of -100 are ignored."""
    return F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def hidden_loss(student_states: Sequence[Tensor], teacher_states: Sequence[Tensor], projections: nn.ModuleList,
                kind: str, mask: Tensor | None = None) -> Tensor:
    """Mean over matched layer pairs of 1 - cos(W s, t) (``cosine``, DistilBERT) or the mean squared
    error of W s and t (``mse``, TinyBERT), with W the pair's learned projection (identity when
    the widths agree), averaged over the positions in ``mask``."""
    total = torch.zeros((), device=student_states[0].device)
    for s, t, projection in zip(student_states, teacher_states, projections, strict=True):
        mapped, target = projection(s).float(), t.float().detach()
        if kind == "cosine":
            per = 1.0 - F.cosine_similarity(mapped, target, dim=-1)
        else:
            per = (mapped - target).pow(2).mean(-1)
        total = total + masked_mean(per, mask)
    return total / len(student_states)


def hidden_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student block, teacher block) pairs: student block i matches teacher block
    (i + 1) * L_t / L_s - 1, so the last blocks meet (TinyBERT's uniform mapping, Jiao et al. 2020)."""
    return [(i, (i + 1) * teacher_layers // student_layers - 1) for i in range(student_layers)]


def make_projections(student_width: int, teacher_width: int, pairs: int) -> nn.ModuleList:
    """One projection per matched pair: Linear(student, teacher) when the widths differ, else identity."""
    if student_width == teacher_width:
        return nn.ModuleList(nn.Identity() for _ in range(pairs))
    layers = [nn.Linear(student_width, teacher_width, bias=False) for _ in range(pairs)]
    for layer in layers:
        nn.init.normal_(layer.weight, std=student_width ** -0.5)  # preserves the scale of the states
    return nn.ModuleList(layers)


def init_from_teacher(student: GPT, teacher: GPT) -> list[int] | None:
    """Copy embeddings, final norm and blocks 0, s, 2s, ... (s = L_t // L_s) of the teacher into
    the student, as DistilBERT took one teacher layer out of two (Sanh et al. 2019). Returns the
    teacher block of each student block, or None when the shapes do not allow it (other width,
    heads, MLP or norm; or more student than teacher blocks)."""
    s_cfg, t_cfg = student.config.to_dict(), teacher.config.to_dict()
    free = {"n_layer", "dropout", "block_size"}
    if any(s_cfg[k] != t_cfg[k] for k in s_cfg if k not in free) or student.config.n_layer > teacher.config.n_layer:
        return None
    if student.config.pos_encoding == "learned" and student.config.block_size != teacher.config.block_size:
        return None
    step = teacher.config.n_layer // student.config.n_layer
    mapping = [i * step for i in range(student.config.n_layer)]
    with torch.no_grad():
        student.wte.weight.copy_(teacher.wte.weight)
        if student.wpe is not None and teacher.wpe is not None:
            student.wpe.weight.copy_(teacher.wpe.weight)
        student.ln_f.load_state_dict(teacher.ln_f.state_dict())
        if not student.config.tie_weights:
            student.lm_head.weight.copy_(teacher.lm_head.weight)
        for i, j in enumerate(mapping):
            student.blocks[i].load_state_dict(teacher.blocks[j].state_dict())
    return mapping


def backbone(model: nn.Module) -> GPT:
    """The GPT inside a model (itself, or a classifier's backbone)."""
    return model if isinstance(model, GPT) else model.backbone  # type: ignore[return-value]


@contextlib.contextmanager
def block_outputs(model: GPT, layers: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """Capture the output of the listed blocks during a forward pass: yields {block: (B, T, C)}."""
    captured: dict[int, Tensor] = {}

    def hook(layer: int):  # noqa: ANN202 - a forward hook closure
        return lambda _module, _inputs, output: captured.__setitem__(layer, output)

    handles = [model.blocks[layer].register_forward_hook(hook(layer)) for layer in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class DistillLoss:
    """The weighted sum of the distillation terms; :meth:`__call__` also returns each term."""

    soft: float = 1.0
    hard: float = 0.0
    reverse_kl: float = 0.0
    hidden: float = 0.0
    temperature: float = 2.0
    hidden_kind: str = "cosine"

    def __call__(
        self,
        student_logits: Tensor,
        targets: Tensor,
        teacher: Teacher | None,
        *,
        mask: Tensor | None = None,
        hidden: tuple[Sequence[Tensor], Sequence[Tensor], nn.ModuleList] | None = None,
        hidden_mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(total loss, {term: value}) for one batch. ``teacher`` may be None only when every
        teacher term has weight 0 (the baseline); ``hidden`` is (student states, teacher states,
        projections) when the hidden weight is positive. ``mask`` selects the positions of the
        logits that count, ``hidden_mask`` those of the hidden states (the real tokens)."""
        parts: dict[str, Tensor] = {}
        if self.hard > 0:
            parts["hard"] = hard_ce(student_logits, targets)
        if self.soft > 0 or self.reverse_kl > 0:
            if teacher is None:
                raise ValueError("soft or reverse_kl weight > 0 but no teacher targets were given")
            if self.soft > 0:
                parts["soft"] = soft_kl(student_logits, teacher, self.temperature, mask)
            if self.reverse_kl > 0:
                parts["reverse_kl"] = reverse_kl(student_logits, teacher, self.temperature, mask)
        if self.hidden > 0:
            if hidden is None:
                raise ValueError("hidden weight > 0 but no hidden states were given")
            parts["hidden"] = hidden_loss(*hidden, kind=self.hidden_kind, mask=hidden_mask)
        weights = {"hard": self.hard, "soft": self.soft, "reverse_kl": self.reverse_kl, "hidden": self.hidden}
        total = sum((weights[name] * value for name, value in parts.items()), torch.zeros((), device=student_logits.device))
        return total, parts


# ------------------------------------------------------------------ precomputed teacher targets


class TeacherCache:
    """The teacher's top-k log-probabilities (fp16) and ids of every training window, memory-mapped
    from ``logp.npy`` and ``ids.npy`` (windows x block_size x k)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.logp = np.load(directory / "logp.npy", mmap_mode="r")
        self.ids = np.load(directory / "ids.npy", mmap_mode="r")

    def rows(self, windows: np.ndarray) -> tuple[Tensor, Tensor]:
        """(B, T, k) float32 log-probabilities and int64 ids of the given windows."""
        return (torch.from_numpy(self.logp[windows].astype(np.float32)),
                torch.from_numpy(self.ids[windows].astype(np.int64)))


def _cache_ready(directory: Path, counts: dict[str, int]) -> bool:
    if not (directory / MANIFEST_NAME).is_file():
        return False
    return read_manifest(directory).get("counts") == counts


def _wait_for_rank_zero(directory: Path, counts: dict[str, int], timeout_s: float = 24 * 3600) -> bool:
    """Under a multi-process launch (torchrun, SLURM) only rank 0 computes the cache; the other
    ranks wait for its manifest. Returns True when this process must not compute it."""
    rank = int(os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or 0)
    if rank == 0:
        return False
    deadline = time.monotonic() + timeout_s
    while not _cache_ready(directory, counts):
        if time.monotonic() > deadline:
            raise DataError("rank 0 did not finish the teacher cache in time", path=str(directory))
        time.sleep(2.0)
    return True


def _device_of(teacher: nn.Module) -> tuple[torch.device, Any]:
    """Where to run the teacher once: the GPU when there is one (bf16 autocast), else the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return device, torch.autocast("cuda", dtype=dtype)
    return torch.device("cpu"), contextlib.nullcontext()


@torch.no_grad()
def precompute_windows(directory: Path, teacher: GPT, tokens: np.ndarray, block: int, windows: int, k: int,
                       temperature: float, batch_size: int, progress: bool = True) -> TeacherCache:
    """Run the teacher once over windows ``j * block .. j * block + block`` (j < ``windows``) of
    ``tokens`` and keep its top-``k`` log-probabilities at ``temperature`` per position in
    ``directory`` (written atomically, reused when complete). Returns the memory-mapped cache."""
    k = min(k, teacher.config.vocab_size)
    counts = {"windows": windows, "block": block, "k": k}
    if _cache_ready(directory, counts) or _wait_for_rank_zero(directory, counts):
        log.info("teacher cache %s: reusing %d windows x %d positions x top-%d", directory.name, windows, block, k)
        return TeacherCache(directory)
    device, autocast = _device_of(teacher)
    teacher.to(device).eval()
    id_dtype = np.uint16 if teacher.config.vocab_size <= 65536 else np.int32
    started = time.perf_counter()
    with atomic_dir(directory) as tmp:
        logp = np.lib.format.open_memmap(tmp / "logp.npy", mode="w+", dtype=np.float16, shape=(windows, block, k))
        ids = np.lib.format.open_memmap(tmp / "ids.npy", mode="w+", dtype=id_dtype, shape=(windows, block, k))
        with Progress(TextColumn("teacher top-k"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      disable=not progress, unit="windows", label="teacher top-k") as bar:
            task = bar.add_task("", total=windows)
            for first in range(0, windows, batch_size):
                rows = np.arange(first, min(first + batch_size, windows))
                idx = torch.from_numpy(tokens[rows[:, None] * block + np.arange(block)].astype(np.int64)).to(device)
                with autocast:
                    logits, _ = teacher(idx)
                top = teacher_topk(logits, k, temperature)
                logp[rows] = top.logp.cpu().numpy().astype(np.float16)
                ids[rows] = top.indices.cpu().numpy().astype(id_dtype)
                bar.update(task, advance=len(rows))
        logp.flush()
        ids.flush()
        del logp, ids
        write_manifest(tmp, stage="distill", config={"temperature": temperature, "k": k}, counts=counts)
    log.info("teacher cache %s: %d windows x %d positions x top-%d in %.1fs", directory.name, windows, block, k,
             time.perf_counter() - started)
    return TeacherCache(directory)


@torch.no_grad()
def precompute_classes(directory: Path, teacher: nn.Module, examples: Sequence[Any],
                       collate: Callable[[list[Any]], dict[str, Tensor]], batch_size: int) -> np.ndarray:
    """The teacher classifier's logits (N, C) for every training example, computed once into
    ``directory/logits.npy`` (atomically, reused when complete). Classes are few, so all are kept."""
    counts = {"examples": len(examples)}
    if not (_cache_ready(directory, counts) or _wait_for_rank_zero(directory, counts)):
        device, autocast = _device_of(teacher)
        teacher.to(device).eval()
        out = []
        for first in range(0, len(examples), batch_size):
            batch = collate(list(examples[first:first + batch_size]))
            with autocast:
                out.append(teacher(batch["input"].to(device), batch["length"].to(device)).float().cpu())
        with atomic_dir(directory) as tmp:
            np.save(tmp / "logits.npy", torch.cat(out).numpy())
            write_manifest(tmp, stage="distill", config={"task": "classification"}, counts=counts)
    return np.load(directory / "logits.npy")
