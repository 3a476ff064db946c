"""Stage ``pretrain``: train the GPT on data/tokens/ and export it to models/pretrain/.

Reads ``data/tokens/{train,val}.bin`` + ``meta.json`` (fingerprint checked against
``artifacts/tokenizer/tokenizer.json``) and, for sample generations, the tokenizer's
sentencepiece model. Writes (rank 0, atomically):
- ``models/pretrain/``: model.safetensors, config.json (with the tokenizer fingerprint, the
  objective and, for a masked LM, its masking under ``mlm``: mask id, rate, special ids), manifest.
  The weights are those of the val evaluation with the lowest loss (``export_weights: best``,
  evaluated every ``eval_every`` steps and at the last) or of the last step (``last``);
- ``metrics/pretrain.json``: final train loss, the exported weights' val loss, val bits per byte
  and step (``export_step``), the train split's unigram entropy (the loss a context-free model
  would reach), tokens/s and MFU;
- ``plots/pretrain_loss.csv`` (step, train_loss, val_loss) and ``plots/pretrain_loss.png``;
- checkpoints under ``checkpoints/pretrain/<run key>/`` (not a DVC output); a rerun of the same
  config resumes from the newest complete one, chosen by rank 0, on any world size that can keep
  the run's global batch (see :func:`accumulation_steps`).
The same config runs on one CPU, N GPUs (``devices``) or several nodes under torchrun / SLURM.
A run stopped by SIGTERM, SIGINT or a SLURM requeue exits with an error and writes no model.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lmpipe import tracking
from lmpipe.config import Paths
from lmpipe.errors import ConfigError
from lmpipe.io import atomic_dir, atomic_write, sha256_file, write_bytes, write_json, write_manifest
from lmpipe.model.gpt import GPT, GPTConfig, estimate_flops_per_token
from lmpipe.model.io import save_model
from lmpipe.train.callbacks import AsyncTracker, BestWeights, SampleGenerations, TrainingMonitor, Validation
from lmpipe.train.checkpoint import ResumePoint, ShardedFSDPStrategy
from lmpipe.train.data import TokenDataModule, open_token_split, unigram_entropy
from lmpipe.train.loop import Run, fit
from lmpipe.train.module import TrainModule
from lmpipe.train.objectives import LanguageModelObjective
from lmpipe.train.pretrain.config import PretrainConfig
from lmpipe.train.settings import run_key

log = logging.getLogger(__name__)

def run(cfg: PretrainConfig, paths: Paths) -> dict[str, Any]:
    """Entry point of ``lmpipe pretrain``; see the module docstring for inputs and outputs."""
    return train(cfg, paths)


def train(cfg: PretrainConfig, paths: Paths, extra_callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train (resuming when a checkpoint of the same run exists), export, return the summary.

    ``extra_callbacks`` run after the stage's own (after the checkpoint of a step is written).
    Raises DataError / FingerprintMismatch for bad token shards, ConfigError for impossible
    settings, TrainingDiverged when the loss stops being finite or spikes.
    """
    train_split = open_token_split(paths.tokens, "train", paths.tokenizer)
    val_split = open_token_split(paths.tokens, "val", paths.tokenizer)
    meta = train_split.meta
    gpt_cfg = cfg.gpt_config(int(meta["vocab_size"]))
    key = run_key(cfg, tokens_meta=sha256_file(paths.tokens / "meta.json"))
    mlm = mlm_settings(cfg, meta) if cfg.objective == "mlm" else None
    flops_per_token = estimate_flops_per_token(gpt_cfg)
    tracker = AsyncTracker(tracking.active())
    datamodule = TokenDataModule(
        train_split, val_split, block_size=gpt_cfg.block_size, micro_batch_size=cfg.micro_batch_size,
        accumulation=1, max_steps=cfg.max_steps, seed=cfg.seed, shuffle=cfg.sampling == "random",
        num_workers=cfg.num_workers, mlm=mlm,
    )
    next(datamodule.val_batches(1, 0, 1))  # a val split shorter than one window fails now, not mid-run
    tokens_per_byte = val_split.n_tokens / val_split.n_bytes if val_split.n_bytes else None

    def start(trainer: L.Trainer, resume: ResumePoint | None) -> TrainModule:
        world = trainer.world_size
        # Accumulation depends on the world size, known once the trainer has read the environment,
        # and on the global batch of the run being resumed.
        datamodule.accumulation = accumulation = accumulation_steps(
            cfg, gpt_cfg.block_size, world, resumed_tokens_per_step=resume.tokens_per_step if resume else None)
        tokens_per_step = cfg.micro_batch_size * gpt_cfg.block_size * accumulation * world
        L.seed_everything(cfg.seed, verbose=False)  # identical initial weights on every rank and rerun
        model = GPT(gpt_cfg)
        module = TrainModule(
            model, LanguageModelObjective(), cfg, seed=cfg.seed, run_key=key, accumulation=accumulation,
            tokens_per_step=tokens_per_step, reseed=gpt_cfg.dropout > 0, compile_model=cfg.compile,
            record={"model": gpt_cfg.to_dict(), "tokens_per_step": tokens_per_step})
        if trainer.is_global_zero:
            log.info("pretrain: %s, %.2fM parameters, %d tokens/step (%d x %d x %d micro-batches x %d devices), "
                     "run %s", cfg.preset, model.num_parameters() / 1e6, tokens_per_step, cfg.micro_batch_size,
                     gpt_cfg.block_size, accumulation, world, key)
            tracker.log_params({"resolved": {
                "accumulation": accumulation, "tokens_per_step": tokens_per_step, "world_size": world,
                "parameters": model.num_parameters(), "flops_per_token": flops_per_token,
                "precision": str(trainer.precision), "run_key": key, "model": gpt_cfg.to_dict()}})
        return module

    fitted = fit(Run(
        label="pretrain", settings=cfg, checkpoint_dir=paths.checkpoints / "pretrain" / key, key=key, tracker=tracker,
        start=start, also_at=(cfg.eval_every, cfg.sample_every), flops_per_token=flops_per_token,
        peak_flops=cfg.peak_flops, datamodule=datamodule, extra_callbacks=extra_callbacks,
        evaluation=lambda monitor: _evaluation(cfg, paths, meta, datamodule, monitor, tracker, tokens_per_byte),
    ))
    trainer, monitor = fitted.trainer, fitted.monitor
    validation = fitted.callbacks[0]
    assert isinstance(validation, Validation)
    selection = validation.selection
    exported: dict[str, float] | None
    # The same choice on every rank (their val losses are reduced), as FSDP gathers on all of them.
    if cfg.export_weights == "best" and selection is not None and selection.best is not None:
        state = selection.state  # the best evaluation's weights, on rank 0
        exported = selection.best
    else:
        state = full_weights(trainer)
        exported = {"step": float(trainer.global_step), "loss": monitor.val[-1][1], "bpb": monitor.val[-1][2]} \
            if monitor.val else None
    summary: dict[str, Any] = {**fitted.summary, "train_tokens": trainer.global_step * int(fitted.module.tokens_per_step)}
    if exported is not None:  # the val scores of the exported weights
        summary["val_loss"], summary["val_bpb"] = exported["loss"], exported.get("bpb", float("nan"))
        summary["export_step"] = int(exported["step"])
    if selection is not None:
        summary["stopped_early"] = int(selection.stopped)
    if "perf/mfu" in monitor.last:
        summary["mfu"] = monitor.last["perf/mfu"]
    if not trainer.is_global_zero:
        return summary
    summary["unigram_entropy"] = unigram_entropy(train_split.tokens, gpt_cfg.vocab_size)
    model = cast(GPT, fitted.module.model)  # under FSDP the wrapper, which forwards num_parameters to the GPT
    summary["parameters"] = model.num_parameters()
    summary["artifacts"] = export(cfg, paths, gpt_cfg, state, meta, summary, monitor)
    return summary


def full_weights(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    """The LightningModule's weights (``model.*``) as CPU copies on rank 0, {} on the other ranks;
    under FSDP gathered from the shards, which every rank must take part in."""
    strategy = trainer.strategy
    if isinstance(strategy, ShardedFSDPStrategy):
        state = strategy.full_state_dict()
    elif trainer.is_global_zero:
        state = strategy.lightning_module_state_dict()
    else:
        return {}
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def accumulation_steps(cfg: PretrainConfig, block_size: int, world_size: int,
                       resumed_tokens_per_step: int | None = None) -> int:
    """Micro-batches per optimizer step so that a step holds ``tokens_per_step`` tokens.

    With ``tokens_per_step`` null a new run takes one micro-batch per device per step. A resumed
    run keeps the global batch it was trained with (``resumed_tokens_per_step``, recorded in its
    checkpoint) whatever the world size now, so it reads the same sample stream: accumulation is
    recomputed, and a world size that cannot reach that batch is refused with a ConfigError.
    """
    per_pass = cfg.micro_batch_size * block_size * world_size
    shape = f"micro_batch_size x block_size x devices = {cfg.micro_batch_size} x {block_size} x {world_size} = {per_pass}"
    if cfg.tokens_per_step is None and resumed_tokens_per_step is not None:
        if resumed_tokens_per_step % per_pass:
            raise ConfigError(
                f"pretrain: cannot resume on {world_size} device(s): the run's checkpoints were trained with "
                f"{resumed_tokens_per_step} tokens per step, which is not a multiple of {shape}, so the global batch "
                "(and the sample stream) would change. Resume on a world size that divides it, or start a new run "
                "(pretrain.resume: false)"
            )
        return resumed_tokens_per_step // per_pass
    if cfg.tokens_per_step is None:
        return 1
    if cfg.tokens_per_step % per_pass:
        raise ConfigError(f"pretrain.tokens_per_step: {cfg.tokens_per_step} is not a multiple of {shape}")
    return cfg.tokens_per_step // per_pass


def mlm_settings(cfg: PretrainConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """Masking parameters for the mlm objective. The mask id: pretrain.mask_token_id, else a mask
    piece among meta.json's special tokens, else its pad id."""
    mask_id = cfg.mask_token_id
    specials = meta.get("special_tokens") or {}
    for piece in ("<|mask|>", "<mask>", "[MASK]"):
        if mask_id is None and piece in specials:
            mask_id = specials[piece]
    if mask_id is None:  # the pad token never occurs inside documents, so it can stand for [MASK]
        mask_id = meta.get("mask_id", meta.get("pad_id"))
    if mask_id is None or not 0 <= int(mask_id) < int(meta["vocab_size"]):
        raise ConfigError(
            "pretrain.mask_token_id: objective 'mlm' needs a mask token id below vocab_size "
            f"{meta['vocab_size']}; meta.json has no mask piece or pad_id, so set it to a reserved token id"
        )
    return {"mask_id": int(mask_id), "vocab_size": int(meta["vocab_size"]), "probability": cfg.mlm_probability,
            "special_ids": (int(meta["eos_id"]),)}


def tokenizer_codec(tokenizer_dir: Path) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]] | None:
    """(encode, decode) of the tokenizer stage's sentencepiece model, or None when there is none
    (samples are then shown as token ids)."""
    if not (tokenizer_dir / "tokenizer.json").is_file():
        return None
    from lmpipe.tokenizer.train import load_tokenizer

    sp, _ = load_tokenizer(tokenizer_dir)
    size = sp.get_piece_size()
    return (lambda text: list(sp.encode(text))), (lambda ids: sp.decode([i for i in ids if i < size]))


def _evaluation(cfg: PretrainConfig, paths: Paths, meta: dict[str, Any], datamodule: TokenDataModule,
                monitor: TrainingMonitor, tracker: AsyncTracker, tokens_per_byte: float | None) -> list[Callback]:
    """Validation (loss and bits per byte; with export_weights: best, the choice of the exported
    weights and early stopping) and, for a causal LM, sample generations."""
    selection = BestWeights(monitor="loss", mode="min", patience=cfg.patience, min_delta=cfg.min_delta) \
        if cfg.export_weights == "best" or cfg.patience else None
    callbacks: list[Callback] = [Validation(
        every=cfg.eval_every, tokens_per_byte=tokens_per_byte, monitor=monitor, selection=selection,
        snapshot=full_weights if cfg.export_weights == "best" else (lambda trainer: {}),
        batches=lambda rank, world: datamodule.val_batches(cfg.eval_batches, rank, world),
    )]
    if cfg.objective == "clm" and cfg.sample_tokens > 0 and cfg.strategy != "fsdp":
        eos = int(meta["eos_id"])
        codec = tokenizer_codec(paths.tokenizer)
        if codec is None:
            prompts, decode = [[eos]], (lambda ids: " ".join(map(str, ids)))
        else:
            encode, decode = codec
            prompts = [[eos, *encode(p)] if p else [eos] for p in cfg.sample_prompts] or [[eos]]
        callbacks.append(SampleGenerations(
            every=cfg.sample_every, prompts=prompts, decode=decode, max_new_tokens=cfg.sample_tokens,
            temperature=cfg.sample_temperature, top_k=cfg.sample_top_k, stop_id=eos, seed=cfg.seed, tracker=tracker,
        ))
    return callbacks


def export(cfg: PretrainConfig, paths: Paths, gpt_cfg: GPTConfig, state: dict[str, torch.Tensor],
           meta: dict[str, Any], summary: dict[str, Any], monitor: TrainingMonitor) -> list[str]:
    """Write the model directory, metrics JSON and loss curve; return the artifact paths."""
    model = GPT(gpt_cfg)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    numbers = {k: v for k, v in summary.items() if isinstance(v, int | float)}
    model_dir = paths.models / "pretrain"
    with atomic_dir(model_dir) as tmp:
        # A masked LM carries its masking, so evaluate scores it at the rate it was trained with.
        masking = {"mlm": mlm_settings(cfg, meta)} if cfg.objective == "mlm" else {}
        save_model(model, tmp, extra={
            "tokenizer_fingerprint": meta["tokenizer_fingerprint"], "eos_id": meta["eos_id"],
            "objective": cfg.objective, **masking, "training": numbers,
        })
        write_manifest(tmp, stage="pretrain", config=cfg, inputs={"tokens_meta": paths.tokens / "meta.json"},
                       counts={"parameters": model.num_parameters(), "steps": summary["steps"],
                               "train_tokens": summary["train_tokens"]})
    metrics_path = paths.metrics / "pretrain.json"
    write_json(metrics_path, numbers)
    csv_path = paths.plots / "pretrain_loss.csv"
    rows: dict[int, list[str]] = {}
    for step, loss in monitor.train:
        rows.setdefault(int(step), ["", ""])[0] = repr(loss)
    for step, loss, _ in monitor.val:
        rows.setdefault(int(step), ["", ""])[1] = repr(loss)
    with atomic_write(csv_path, "w", encoding="utf-8") as handle:
        handle.write("step,train_loss,val_loss\n")
        handle.writelines(f"{step},{train},{val}\n" for step, (train, val) in sorted(rows.items()))
    png_path = paths.plots / "pretrain_loss.png"
    write_bytes(png_path, loss_plot(monitor, summary.get("unigram_entropy"), summary.get("export_step")))
    return [str(model_dir), str(metrics_path), str(csv_path), str(png_path)]


def loss_plot(monitor: TrainingMonitor, unigram: float | None, export_step: int | None = None) -> bytes:
    """PNG of train and val loss against step, with the unigram entropy as a reference line and
    the step of the exported weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if monitor.train:
        ax.plot(*zip(*monitor.train, strict=True), label="train")
    if monitor.val:
        ax.plot([r[0] for r in monitor.val], [r[1] for r in monitor.val], marker="o", label="val")
    if unigram is not None:
        ax.axhline(unigram, color="grey", linestyle="--", label="unigram entropy")
    if export_step is not None and monitor.val:
        ax.axvline(export_step, color="green", linestyle=":", label=f"exported weights (step {export_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
