"""A GPT-style decoder in plain PyTorch, readable top to bottom.

Shape: token embedding -> (optional position signal) -> n_layer pre-norm blocks
(x + attn(norm(x)), x + mlp(norm(x))) -> final norm -> LM head tied to the embedding.

Choices and where they come from:
- Positions: rotary (Su et al. 2021, RoFormer) by default; fixed sinusoidal (Vaswani et al. 2017)
  or learned absolute (GPT-2) on request.
- Pre-norm with LayerNorm (GPT-2) or RMSNorm (Zhang & Sennrich 2019).
- Attention through ``F.scaled_dot_product_attention``: PyTorch picks flash / memory-efficient
  kernels on GPU, so no hand-written softmax(QK^T) here. Grouped-query attention (Ainslie et al.
  2023) when ``n_kv_head < n_head``: fewer K/V heads, smaller KV cache.
- MLP with GELU (GPT-2), SwiGLU (Shazeer 2020), the latter with 2/3 of the width so the
  parameter count matches, or ReLU squared (So et al. 2021, Primer), as cheap as GELU.
- ``qk_norm``: RMSNorm on each head's queries and keys before the dot product (Henry et al. 2020;
  Dehghani et al. 2023), which bounds the attention logits and so tolerates larger learning rates.
- ``embed_scale``: token embeddings multiplied by sqrt(n_embd) (Vaswani et al. 2017), so with
  N(0, 0.02) init the input to the first block is not tiny next to what the blocks add.
- Init as GPT-2 (Radford et al. 2019): N(0, 0.02), and residual output projections scaled by
  1/sqrt(2 * n_layer) because each block adds two residual branches.
- ``bidirectional=True`` drops the causal mask and adds BERT's MLM head transform
  (Devlin et al. 2019: dense -> GELU -> norm before the tied decoder) for masked-LM pretraining.

Generation keeps a preallocated KV cache so each new token costs one position, not the whole
prefix; ``use_cache=False`` recomputes everything and exists to check the cache against.

Nothing here knows about Lightning, devices or parallelism: ``lmpipe.train`` applies those.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
POS_ENCODINGS = ("rope", "sinusoidal", "learned")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")
# The options of the string fields of GPTConfig, by field name.
CHOICES = {"pos_encoding": POS_ENCODINGS, "norm": NORMS, "mlp": MLPS}


def knob(default: Any, doc: str, **bounds: float) -> Any:
    """A GPTConfig field with its one-line description and bounds (``gt``/``ge``/``lt``), from
    which the config sections that override architectures (``pretrain.model``) are built."""
    return field(default=default, metadata={"doc": doc, **bounds})


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = knob(128, "Context length in tokens.", gt=1)
    n_layer: int = knob(4, "Transformer blocks.", gt=0)
    n_head: int = knob(4, "Attention (query) heads per block.", gt=0)
    # None: as many K/V heads as query heads (plain multi-head)
    n_kv_head: int | None = knob(None, "Key/value heads (grouped-query attention); null: one per query head.", gt=0)
    n_embd: int = knob(128, "Model width.", gt=0)
    # SwiGLU uses 2/3 of the hidden width, rounded up to 64
    mlp_ratio: float = knob(4.0, "MLP hidden width / model width.", gt=0)
    mlp: str = knob("gelu", "MLP activation: gelu (GPT-2), swiglu, or relu2 (ReLU squared, Primer).")
    norm: str = knob("layernorm", "Pre-norm type.")
    qk_norm: bool = knob(False, "RMSNorm on each head's queries and keys before attention (QK-norm).")
    norm_eps: float = 1e-5
    pos_encoding: str = knob("rope", "Position signal: rotary (default), fixed sinusoidal or learned absolute.")
    rope_theta: float = knob(10_000.0, "Rotary base frequency.", gt=0)  # RoFormer's base
    dropout: float = knob(0.0, "Dropout on attention, residual and embeddings.", ge=0, lt=1)
    # no biases in Linear/LayerNorm: slightly better and faster (nanoGPT)
    bias: bool = knob(False, "Biases in Linear and LayerNorm layers.")
    tie_weights: bool = knob(True, "Share the token embedding with the LM head (false: an untied head).")
    embed_scale: bool = knob(False, "Multiply token embeddings by sqrt(n_embd) (Vaswani et al. 2017).")
    bidirectional: bool = False  # True: no causal mask, MLM head (BERT-style objective)

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        problems = []
        if self.n_embd % self.n_head:
            problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        elif self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2:
            problems.append("rotary positions need an even head size (n_embd / n_head)")
        if self.n_head % self.n_kv_head:
            problems.append(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            problems.append("sinusoidal positions need an even n_embd")
        for name, value, allowed in (("pos_encoding", self.pos_encoding, POS_ENCODINGS),
                                     ("norm", self.norm, NORMS), ("mlp", self.mlp, MLPS)):
            if value not in allowed:
                problems.append(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if min(self.vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd) < 1:
            problems.append("vocab_size, block_size, n_layer, n_head and n_embd must be positive")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.mlp_ratio * self.n_embd)
        if self.mlp == "swiglu":  # three matrices instead of two: keep the parameter count (Shazeer 2020)
            hidden = 64 * math.ceil(2 * hidden / 3 / 64)
        return hidden

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Build from a dict, rejecting unknown keys (a config.json from another model type)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys: {', '.join(unknown)}")
        return cls(**data)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rotary_tables(cfg: GPTConfig) -> tuple[Tensor, Tensor]:
    """cos and sin tables, (block_size, head_dim), for the rotate-half formulation of RoPE."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by position-dependent angles; x is (B, H, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def sinusoidal_table(block_size: int, n_embd: int) -> Tensor:
    position = torch.arange(block_size, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float32) * (-math.log(10_000.0) / n_embd))
    table = torch.zeros(block_size, n_embd)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)
    return table


class KVCache:
    """Keys and values of every layer for positions [0, length), preallocated to block_size."""

    def __init__(self, cfg: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head or cfg.n_head, cfg.block_size, cfg.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H_kv, T, D) at the current position; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head or cfg.n_head, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.causal = not cfg.bidirectional
        self.dropout = cfg.dropout
        # One gain per head dimension, shared by the heads (OLMo 2); None without QK-norm.
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: KVCache | None, layer: int,
                keep: Tensor | None = None) -> Tensor:
        """``keep`` (B, 1, 1, T) bool marks the keys every query may attend to (False: padding)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # before rotary, which keeps the norm
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
        mask = keep
        is_causal = self.causal and T > 1 and keep is None
        if self.causal and past > 0:
            # Queries sit at positions past..past+T-1; SDPA's is_causal aligns to the top-left,
            # which is wrong once keys outnumber queries, so spell the mask out (one token: none).
            is_causal = False
            if T > 1:
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.swiglu, self.relu2 = cfg.mlp == "swiglu", cfg.mlp == "relu2"
        hidden = cfg.mlp_hidden
        # SwiGLU's gate and up projections are one matmul, split afterwards.
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.relu2:
            h = F.relu(h).square()
        else:
            h = F.gelu(h)
        return F.dropout(self.c_proj(h), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: KVCache | None, layer: int,
                keep: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, layer, keep)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    rope_cos: Tensor  # position tables, registered as buffers when the encoding uses them
    rope_sin: Tensor
    pos_table: Tensor

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.embed_scale = math.sqrt(cfg.n_embd) if cfg.embed_scale else None
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_encoding == "learned" else None
        if cfg.pos_encoding == "rope":
            cos, sin = rotary_tables(cfg)
            # Derived from the config, so not saved with the weights (persistent=False).
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        elif cfg.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.block_size, cfg.n_embd), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.mlm_head = None
        if cfg.bidirectional:
            self.mlm_head = nn.Sequential(nn.Linear(cfg.n_embd, cfg.n_embd, bias=True), nn.GELU(), make_norm(cfg))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:  # Press & Wolf 2017: one matrix for input and output embeddings
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------------------ forward

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, *, cache: KVCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, V), mean cross-entropy over targets != -100 or None).

        With ``cache`` the tokens continue the cached sequence (positions cache.length onwards) and
        the cache is advanced by T.
        """
        x = self.hidden_states(idx, cache=cache)
        if self.mlm_head is not None:
            x = self.mlm_head(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            # fp32 softmax even under bf16 autocast: the loss is a sum over a large vocabulary.
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return logits, loss

    def hidden_states(self, idx: Tensor, lengths: Tensor | None = None, *, cache: KVCache | None = None) -> Tensor:
        """(B, T, n_embd) output of the final norm for token ids ``idx`` (B, T): what a task head
        (sequence or token classification) reads, for a causal decoder or a bidirectional encoder.

        ``lengths`` (B,) counts the real tokens of right-padded rows. A causal model needs no mask
        for them (a real token never sees the padding after it); a bidirectional one would attend
        to the padding, so its attention is limited to each row's first ``lengths`` keys (BERT's
        attention mask).
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        x = self.wte(idx)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self.pos_table[start:start + T]
        else:
            rope = (self.rope_cos[start:start + T].to(x.dtype), self.rope_sin[start:start + T].to(x.dtype))
        x = self.drop(x)
        keep = None
        if lengths is not None and self.config.bidirectional:
            keep = (torch.arange(T, device=idx.device)[None, :] < lengths[:, None].to(idx.device))[:, None, None, :]
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer, keep)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    # --------------------------------------------------------------------------- accounting

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Unique parameters (tied weights counted once); ``non_embedding`` drops embedding tables."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.wte.weight.numel()
            if self.wpe is not None:
                total -= self.wpe.weight.numel()
        return total

    # ----------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_tokens: Iterable[int] = (),
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue ``idx`` (B, T) by up to ``max_new_tokens``; returns (B, T + n).

        ``temperature=0`` is greedy decoding. A row that emits a stop token keeps emitting that
        token until every row has stopped, then generation ends early. Once the sequence outgrows
        block_size the context window slides (the oldest tokens drop out) and the cache is rebuilt
        from the window, exactly what recomputing would see.
        """
        if self.config.bidirectional:
            raise ValueError("a bidirectional (MLM) model cannot generate left to right")
        stops = torch.tensor(sorted(set(stop_tokens)), dtype=idx.dtype, device=idx.device)
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        fill = torch.zeros_like(finished, dtype=idx.dtype)
        block = self.config.block_size
        cache: KVCache | None = None
        for _ in range(max_new_tokens):
            if use_cache and cache is not None and cache.length < block:
                logits, _ = self(idx[:, -1:], cache=cache)
            else:
                window = idx[:, -block:]
                if use_cache:
                    cache = KVCache(self.config, idx.shape[0], idx.device, self.wte.weight.dtype)
                logits, _ = self(window, cache=cache)
            token = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            if stops.numel():
                token = torch.where(finished, fill, token)
                hit = torch.isin(token, stops)
                fill = torch.where(hit & ~finished, token, fill)
                finished = finished | hit
            idx = torch.cat([idx, token[:, None]], dim=1)
            if stops.numel() and bool(finished.all()):
                break
        return idx


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row from (B, V) logits: greedy at temperature 0, else sample after
    top-k and nucleus (top-p, Holtzman et al. 2020) filtering."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def estimate_flops_per_token(cfg: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6N + 12 * n_layer * n_embd * T (PaLM, Chowdhery et al. 2022, app. B).

    N counts the matrices that do a matmul per token: every block, plus the LM head (vocab x
    n_embd; with tied weights it is the embedding matrix). Embedding lookups cost no FLOPs. The
    second term is attention's QK^T and AV over a context of T = seq_len tokens.
    """
    with torch.device("meta"):
        model = GPT(cfg)
    n = model.num_parameters(non_embedding=True)  # an untied LM head is already in here
    if cfg.tie_weights:
        n += cfg.vocab_size * cfg.n_embd
    t = seq_len if seq_len is not None else cfg.block_size
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_embd * t


def optim_groups(model: nn.Module, weight_decay: float, muon_weight_decay: float | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups over the *trainable* parameters of ``model`` (a GPT, or one
    wrapped by a classification head or LoRA): decay matrices of Linear layers only; norms, biases
    and embeddings (including an LM head tied to the embedding) get none (nanoGPT). Frozen
    parameters (LoRA's base) are left out, so weight decay cannot move them.

    With ``muon_weight_decay`` (the Muon optimizer) the 2-D weights inside the transformer blocks
    come first, as a group marked ``"muon": True`` with that decay: Muon orthogonalises the update
    of a hidden layer's matrix (Jordan et al. 2024), which suits neither the embedding and head
    (a row per token) nor vectors. The other groups, for AdamW, are marked ``"muon": False``."""
    no_decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    muon_ids: set[int] = set()
    if muon_weight_decay is not None:
        muon_ids = {id(p) for block in model.modules() if isinstance(block, Block)
                    for p in block.parameters() if p.dim() == 2 and id(p) not in no_decay_ids}
    muon, decay, no_decay = [], [], []
    for param in model.parameters():  # unique parameters, so a tied matrix appears once
        if not param.requires_grad:
            continue
        if id(param) in muon_ids:
            muon.append(param)
        elif param.dim() >= 2 and id(param) not in no_decay_ids:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "muon": False},
              {"params": no_decay, "weight_decay": 0.0, "muon": False}]
    if muon_weight_decay is not None:
        groups.insert(0, {"params": muon, "weight_decay": muon_weight_decay, "muon": True})
    return groups
