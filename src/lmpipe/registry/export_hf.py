"""Export a GPT model directory to a Hugging Face ``transformers`` model directory, verified.

Writes ``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer (the
tokenizer stage's ``hf/`` export) so that ``AutoModelForCausalLM.from_pretrained(dir)`` and
``AutoTokenizer.from_pretrained(dir)`` load it offline. The directory is built in a temporary
sibling, loaded back with ``transformers``, and swapped in only when the logits on a sample match
the lmpipe model's to fp32 tolerance.

Only exact mappings are exported; anything else is refused with an ExportError:
- rotary + RMSNorm + SwiGLU -> ``LlamaForCausalLM`` (grouped-query attention kept; biases map to
  ``attention_bias`` / ``mlp_bias``);
- rotary + LayerNorm + GELU -> ``GPTNeoXForCausalLM`` with ``partial_rotary_factor`` 1.0 and
  sequential residuals (``use_parallel_residual: false``); NeoX always has biases, so a bias-free
  model gets zero biases, and K/V heads are repeated when the model uses grouped-query attention;
- learned positions + LayerNorm + GELU -> ``GPT2LMHeadModel`` with the exact (erf) GELU.
Both rotary targets rotate halves (``rotate_half``: pairs (x_i, x_{i+d/2})), which is the
convention of ``lmpipe.model.gpt.apply_rotary``; so Q/K weights need no permutation (the permute in
HF's Llama conversion script is for checkpoints trained with the interleaved convention).
Sinusoidal positions, bidirectional (masked-LM) models and other combinations have no exact
``transformers`` counterpart.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmpipe.config import Paths
from lmpipe.errors import LmpipeError
from lmpipe.io import atomic_dir, write_manifest
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.model.io import ExpectedTokenizer, load_model, read_model_config, refuse_masked_lm
from lmpipe.tokenizer.train import HF_DIR, load_tokenizer

log = logging.getLogger(__name__)

SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog. 0123456789 <|user|> Hello?"


class ExportError(LmpipeError):
    """The model has no exact transformers counterpart, or the export did not reproduce it."""


def architecture(cfg: GPTConfig) -> str:
    """The transformers class that reproduces ``cfg`` exactly; ExportError if none does."""
    if cfg.bidirectional:
        raise ExportError("a bidirectional (masked-LM) model has no causal-LM counterpart in transformers")
    if cfg.qk_norm or cfg.embed_scale:
        raise ExportError(f"no exact transformers architecture for qk_norm={cfg.qk_norm}, embed_scale={cfg.embed_scale} "
                          "(the exported architectures have neither)")
    combo = (cfg.pos_encoding, cfg.norm, cfg.mlp)
    if combo == ("rope", "rmsnorm", "swiglu"):
        return "LlamaForCausalLM"
    if combo == ("rope", "layernorm", "gelu"):
        return "GPTNeoXForCausalLM"
    if combo == ("learned", "layernorm", "gelu"):
        return "GPT2LMHeadModel"
    raise ExportError(
        f"no exact transformers architecture for pos_encoding={cfg.pos_encoding}, norm={cfg.norm}, mlp={cfg.mlp} "
        "(exported: rope+rmsnorm+swiglu -> Llama, rope+layernorm+gelu -> GPT-NeoX, learned+layernorm+gelu -> GPT-2)"
    )


def _split_qkv(cfg: GPTConfig, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """c_attn's output rows (or bias) split into q (n_head*D), k and v (n_kv_head*D each)."""
    q_size, kv_size = cfg.n_head * cfg.head_dim, (cfg.n_kv_head or cfg.n_head) * cfg.head_dim
    return weight[:q_size], weight[q_size:q_size + kv_size], weight[q_size + kv_size:]


def _repeat_kv(cfg: GPTConfig, t: Tensor) -> Tensor:
    """K or V rows of n_kv_head heads repeated to n_head heads: query head h reads K/V head
    h // (n_head / n_kv_head), as SDPA's grouped-query attention does, so the result is exact."""
    group = cfg.n_head // (cfg.n_kv_head or cfg.n_head)
    heads = t.reshape(cfg.n_kv_head or cfg.n_head, cfg.head_dim, *t.shape[1:])
    return heads.repeat_interleave(group, dim=0).reshape(cfg.n_head * cfg.head_dim, *t.shape[1:])


def _bias(state: dict[str, Tensor], name: str, size: int) -> Tensor:
    """The bias ``name`` or zeros: a model without biases equals one with zero biases."""
    return state[name] if name in state else torch.zeros(size, dtype=state["wte.weight"].dtype)


def convert(cfg: GPTConfig, state: dict[str, Tensor], special_ids: dict[str, int]) -> tuple[Any, dict[str, Tensor]]:
    """(transformers config, tensors by transformers name) for a GPT's config and state dict."""
    arch = architecture(cfg)
    if arch == "LlamaForCausalLM":
        return _to_llama(cfg, state, special_ids)
    if arch == "GPTNeoXForCausalLM":
        return _to_neox(cfg, state, special_ids)
    return _to_gpt2(cfg, state, special_ids)


def _token_ids(special_ids: dict[str, int]) -> dict[str, Any]:
    return {"bos_token_id": special_ids["bos"], "eos_token_id": special_ids["eos"], "pad_token_id": special_ids["pad"]}


def _to_llama(cfg: GPTConfig, state: dict[str, Tensor], special_ids: dict[str, int]) -> tuple[Any, dict[str, Tensor]]:
    from transformers import LlamaConfig

    hf = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_weights, attention_bias=cfg.bias, mlp_bias=cfg.bias,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, **_token_ids(special_ids),
    )
    out = {"model.embed_tokens.weight": state["wte.weight"], "model.norm.weight": state["ln_f.weight"]}
    hidden = cfg.mlp_hidden
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = state[src + "ln_1.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "ln_2.weight"]
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = _split_qkv(cfg, state[src + f"attn.c_attn.{kind}"])
            out[dst + f"self_attn.q_proj.{kind}"], out[dst + f"self_attn.k_proj.{kind}"] = q, k
            out[dst + f"self_attn.v_proj.{kind}"] = v
            out[dst + f"self_attn.o_proj.{kind}"] = state[src + f"attn.c_proj.{kind}"]
            # c_fc computes [gate | up] in one matmul (lmpipe.model.gpt.MLP), split in that order.
            gate_up = state[src + f"mlp.c_fc.{kind}"]
            out[dst + f"mlp.gate_proj.{kind}"], out[dst + f"mlp.up_proj.{kind}"] = gate_up[:hidden], gate_up[hidden:]
            out[dst + f"mlp.down_proj.{kind}"] = state[src + f"mlp.c_proj.{kind}"]
    if not cfg.tie_weights:
        out["lm_head.weight"] = state["lm_head.weight"]
    return hf, out


def _to_neox(cfg: GPTConfig, state: dict[str, Tensor], special_ids: dict[str, int]) -> tuple[Any, dict[str, Tensor]]:
    from transformers import GPTNeoXConfig

    hf = GPTNeoXConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=cfg.mlp_hidden, hidden_act="gelu",
        max_position_embeddings=cfg.block_size, layer_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_weights,
        use_parallel_residual=False, attention_bias=True, attention_dropout=0.0, hidden_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0},
        **_token_ids(special_ids),
    )
    C, hidden = cfg.n_embd, cfg.mlp_hidden
    out = {"gpt_neox.embed_in.weight": state["wte.weight"], "gpt_neox.final_layer_norm.weight": state["ln_f.weight"],
           "gpt_neox.final_layer_norm.bias": _bias(state, "ln_f.bias", C)}
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        for norm, target in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            out[dst + f"{target}.weight"] = state[src + f"{norm}.weight"]
            out[dst + f"{target}.bias"] = _bias(state, src + f"{norm}.bias", C)
        qkv_bias = _bias(state, src + "attn.c_attn.bias", state[src + "attn.c_attn.weight"].shape[0])
        for kind, tensor in (("weight", state[src + "attn.c_attn.weight"]), ("bias", qkv_bias)):
            q, k, v = _split_qkv(cfg, tensor)
            k, v = _repeat_kv(cfg, k), _repeat_kv(cfg, v)
            # NeoX views the fused output as (heads, 3 * head_dim): per head [q_h; k_h; v_h].
            per_head = [t.reshape(cfg.n_head, cfg.head_dim, *t.shape[1:]) for t in (q, k, v)]
            out[dst + f"attention.query_key_value.{kind}"] = torch.stack(per_head, dim=1).reshape(3 * C, *tensor.shape[1:])
        out[dst + "attention.dense.weight"] = state[src + "attn.c_proj.weight"]
        out[dst + "attention.dense.bias"] = _bias(state, src + "attn.c_proj.bias", C)
        out[dst + "mlp.dense_h_to_4h.weight"] = state[src + "mlp.c_fc.weight"]
        out[dst + "mlp.dense_h_to_4h.bias"] = _bias(state, src + "mlp.c_fc.bias", hidden)
        out[dst + "mlp.dense_4h_to_h.weight"] = state[src + "mlp.c_proj.weight"]
        out[dst + "mlp.dense_4h_to_h.bias"] = _bias(state, src + "mlp.c_proj.bias", C)
    if not cfg.tie_weights:
        out["lm_head.weight"] = state["lm_head.weight"]
    return hf, out


def _to_gpt2(cfg: GPTConfig, state: dict[str, Tensor], special_ids: dict[str, int]) -> tuple[Any, dict[str, Tensor]]:
    from transformers import GPT2Config

    hf = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.mlp_hidden, activation_function="gelu", layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=cfg.tie_weights,
        **_token_ids(special_ids),
    )
    C, hidden = cfg.n_embd, cfg.mlp_hidden
    out = {"transformer.wte.weight": state["wte.weight"], "transformer.wpe.weight": state["wpe.weight"],
           "transformer.ln_f.weight": state["ln_f.weight"], "transformer.ln_f.bias": _bias(state, "ln_f.bias", C)}
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        for norm in ("ln_1", "ln_2"):
            out[dst + f"{norm}.weight"] = state[src + f"{norm}.weight"]
            out[dst + f"{norm}.bias"] = _bias(state, src + f"{norm}.bias", C)
        q, k, v = _split_qkv(cfg, state[src + "attn.c_attn.weight"])
        qkv = torch.cat([q, _repeat_kv(cfg, k), _repeat_kv(cfg, v)])
        qb, kb, vb = _split_qkv(cfg, _bias(state, src + "attn.c_attn.bias", state[src + "attn.c_attn.weight"].shape[0]))
        # GPT-2's Conv1D stores (in, out): the transpose of nn.Linear's weight.
        out[dst + "attn.c_attn.weight"] = qkv.t().contiguous()
        out[dst + "attn.c_attn.bias"] = torch.cat([qb, _repeat_kv(cfg, kb), _repeat_kv(cfg, vb)])
        for module, size in (("attn.c_proj", C), ("mlp.c_fc", hidden), ("mlp.c_proj", C)):
            out[dst + f"{module}.weight"] = state[src + f"{module}.weight"].t().contiguous()
            out[dst + f"{module}.bias"] = _bias(state, src + f"{module}.bias", size)
    if not cfg.tie_weights:
        out["lm_head.weight"] = state["lm_head.weight"]
    return hf, out


# -------------------------------------------------------------------------------------- export


def export_hf(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
              tokenizer_dir: str | os.PathLike[str], *, atol: float = 1e-4) -> dict[str, Any]:
    """Write the transformers export of ``model_dir`` to ``out_dir`` (swapped in whole when verified).

    Reads the model directory and the tokenizer directory (its ``hf/`` export). Returns
    {architecture, max_abs_logit_diff, tokens_checked, out_dir}. Raises ConfigError for a masked
    LM (from its config.json, before anything else is read), ExportError (no exact mapping, or the
    reloaded model's logits differ by more than ``atol`` scaled by the logits' magnitude),
    FingerprintMismatch (model trained with another tokenizer), DataError (bad input).
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    refuse_masked_lm(read_model_config(model_dir), model_dir, "export-hf --model",
                     "a transformers causal-LM export predicts each token")
    sp, info = load_tokenizer(tokenizer_dir)
    model, config = load_model(model_dir, tokenizer=ExpectedTokenizer(info.fingerprint, str(tokenizer_dir)))
    arch = architecture(model.config)
    if "classifier" in config:
        log.warning("%s is a classifier: only its decoder is exported (transformers has no exact head for it)", model_dir)
    special = {"bos": info.bos_id, "eos": info.eos_id, "pad": info.pad_id}
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    hf_config, tensors = convert(model.config, state, special)
    hf_config.architectures = [arch]
    with atomic_dir(out_dir) as tmp:
        hf_config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        GenerationConfig(**_token_ids(special)).save_pretrained(tmp)
        for file in sorted((info.directory / HF_DIR).iterdir()):
            if file.is_file():
                shutil.copy2(file, tmp / file.name)
        result = verify(model, tmp, sp, atol=atol)
        write_manifest(tmp, stage="export-hf", config={"architecture": arch, "atol": atol},
                       inputs={"model": model_dir, "tokenizer": info.directory / "tokenizer.json"},
                       extra={"architecture": arch, "max_abs_logit_diff": result["max_abs_logit_diff"]})
    log.info("exported %s as %s to %s (max |logit diff| %.2e over %d tokens)", model_dir, arch, out_dir,
             result["max_abs_logit_diff"], result["tokens_checked"])
    return {"architecture": arch, **result, "out_dir": str(out_dir)}


def verify(model: GPT, directory: Path, sp: Any, *, atol: float = 1e-4) -> dict[str, Any]:
    """Load ``directory`` with transformers (offline) and compare it with ``model``: the
    tokenizer's ids on a sample text, and the logits of every position of that sample.

    Raises ExportError on missing/unexpected weights, different token ids or logits beyond tolerance.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded: Any = AutoModelForCausalLM.from_pretrained(
        directory, local_files_only=True, dtype=torch.float32, output_loading_info=True)
    hf_model, loading = loaded
    problems = {k: v for k, v in loading.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ExportError(f"{directory}: transformers loaded the export with {problems}")
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    ids = list(sp.encode(SAMPLE_TEXT))
    hf_ids = tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    if hf_ids != ids:
        raise ExportError(f"{directory}: the exported tokenizer gives other ids than sentencepiece on {SAMPLE_TEXT!r}")
    block = model.config.block_size
    sample = ([sp.eos_id()] + ids * (block // max(len(ids), 1) + 1))[:block]
    idx = torch.tensor([sample], dtype=torch.long)
    model = model.float().eval()
    hf_model.eval()
    with torch.no_grad():
        expected, _ = model(idx)
        actual = hf_model(input_ids=idx).logits
    diff = float((expected - actual).abs().max())
    tolerance = atol * max(1.0, float(expected.abs().max()))
    if not diff <= tolerance:  # also catches NaN
        raise ExportError(f"{directory}: transformers logits differ from the model's by {diff:.3g} (> {tolerance:.3g})")
    return {"max_abs_logit_diff": diff, "tokens_checked": len(sample)}


def run_export(paths: Paths, model: str = "models/pretrain", out: str | None = None) -> dict[str, Any]:
    """``lmpipe export-hf [--model DIR] [--out DIR]``: default output ``artifacts/hf/<model dir name>``."""
    model_dir = paths.root / model
    out_dir = paths.root / out if out else paths.root / "artifacts" / "hf" / model_dir.name
    return export_hf(model_dir, out_dir, paths.tokenizer)
