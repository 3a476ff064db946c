"""Stage ``pretrain``: train the GPT on data/tokens/ and export it to models/pretrain/.

Reads ``data/tokens/{train,val}.bin`` + ``meta.json`` (fingerprint checked against
``artifacts/tokenizer/tokenizer.json``) and, for sample generations, the tokenizer's
sentencepiece model. Writes (rank 0, atomically):
- ``models/pretrain/``: model.safetensors, config.json (with the tokenizer fingerprint), manifest;
- ``metrics/pretrain.json``: final train/val loss, val bits per byte, the train split's unigram
  entropy (the loss a context-free model would reach), tokens/s and MFU;
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
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmpipe import tracking
from lmpipe.config import Paths
from lmpipe.errors import ConfigError
from lmpipe.io import atomic_dir, atomic_write, sha256_file, write_bytes, write_json, write_manifest
from lmpipe.model.gpt import GPT, Block, GPTConfig, estimate_flops_per_token
from lmpipe.model.io import save_model
from lmpipe.train.callbacks import (
    AsyncTracker,
    DivergenceGuard,
    SampleGenerations,
    StepProgress,
    TrainingInterrupted,
    TrainingMonitor,
    Validation,
)
from lmpipe.train.checkpoint import (
    AtomicCheckpointIO,
    PeriodicCheckpoint,
    ShardedFSDPStrategy,
    agreed_resume_checkpoint,
    reject_lightning_requeue_checkpoints,
)
from lmpipe.train.data import TokenDataModule, open_token_split, unigram_entropy
from lmpipe.train.module import PretrainModule
from lmpipe.train.pretrain.config import PretrainConfig
from lmpipe.train.settings import run_key

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s of one device, from the vendors' datasheets (for MFU when not configured).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def run(cfg: PretrainConfig, paths: Paths) -> dict[str, Any]:
    """Entry point of ``lmpipe pretrain``; see the module docstring for inputs and outputs."""
    return train(cfg, paths)


def train(cfg: PretrainConfig, paths: Paths, extra_callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train (resuming when a checkpoint of the same run exists), export, return the summary.

    ``extra_callbacks`` run after the stage's own (after the checkpoint of a step is written).
    Raises DataError / FingerprintMismatch for bad token shards, ConfigError for impossible
    settings, TrainingDiverged when the loss stops being finite or spikes.
    """
    _quiet_lightning()
    train_split = open_token_split(paths.tokens, "train", paths.tokenizer)
    val_split = open_token_split(paths.tokens, "val", paths.tokenizer)
    meta = train_split.meta
    gpt_cfg = cfg.gpt_config(int(meta["vocab_size"]))
    key = run_key(cfg, tokens_meta=sha256_file(paths.tokens / "meta.json"))
    ckpt_dir = paths.checkpoints / "pretrain" / key
    mlm = mlm_settings(cfg, meta) if cfg.objective == "mlm" else None
    flops_per_token = estimate_flops_per_token(gpt_cfg)

    tracker = AsyncTracker(tracking.active())
    monitor = TrainingMonitor(
        log_every=cfg.log_every, also_at=(cfg.val_every, cfg.checkpoint_every, cfg.sample_every),
        tracker=tracker, flops_per_token=flops_per_token, peak_flops=None,
        guard=DivergenceGuard(cfg.spike_factor, cfg.warmup_steps),
    )
    datamodule = TokenDataModule(
        train_split, val_split, block_size=gpt_cfg.block_size, micro_batch_size=cfg.micro_batch_size,
        accumulation=1, max_steps=cfg.max_steps, seed=cfg.seed, shuffle=cfg.sampling == "random",
        num_workers=cfg.num_workers, mlm=mlm,
    )
    next(datamodule.val_batches(1, 0, 1))  # a val split shorter than one window fails now, not mid-run
    tokens_per_byte = val_split.n_tokens / val_split.n_bytes if val_split.n_bytes else None
    callbacks = [monitor, *_stage_callbacks(cfg, paths, meta, datamodule, monitor, tracker, tokens_per_byte, ckpt_dir),
                 *extra_callbacks]
    trainer = build_trainer(cfg, callbacks, ckpt_dir)
    world = trainer.world_size
    resume = agreed_resume_checkpoint(trainer, ckpt_dir, key) if cfg.resume else None
    if resume is None:
        reject_lightning_requeue_checkpoints(ckpt_dir)
    # Accumulation depends on the world size, known once the trainer has read the environment,
    # and on the global batch of the run being resumed.
    datamodule.accumulation = accumulation = accumulation_steps(
        cfg, gpt_cfg.block_size, world, resumed_tokens_per_step=resume.tokens_per_step if resume else None)
    tokens_per_step = cfg.micro_batch_size * gpt_cfg.block_size * accumulation * world
    monitor.peak_flops = cfg.peak_flops or peak_flops(trainer)

    L.seed_everything(cfg.seed, verbose=False)  # identical initial weights on every rank and rerun
    module = PretrainModule(gpt_cfg, cfg, accumulation=accumulation, tokens_per_step=tokens_per_step, run_key=key)
    if trainer.is_global_zero:
        log.info("pretrain: %s, %.2fM parameters, %d tokens/step (%d x %d x %d micro-batches x %d devices), run %s",
                 cfg.preset, module.model.num_parameters() / 1e6, tokens_per_step, cfg.micro_batch_size,
                 gpt_cfg.block_size, accumulation, world, key)
        if resume:
            log.info("resuming from %s (step %d)", resume.path, resume.step)
        tracker.log_params({"resolved": {
            "accumulation": accumulation, "tokens_per_step": tokens_per_step, "world_size": world,
            "parameters": module.model.num_parameters(), "flops_per_token": flops_per_token,
            "precision": str(trainer.precision), "run_key": key, "model": gpt_cfg.to_dict()}})
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.path if resume else None, weights_only=True)
    except SIGTERMException:
        # Lightning stops every rank at a step boundary on SIGTERM but exits with status 0, which
        # would pass for success to DVC and the flow.
        raise TrainingInterrupted(f"stopped by SIGTERM at step {trainer.global_step}; no model was written "
                                  "(the next run resumes from the newest checkpoint)") from None
    finally:
        tracker.close()

    strategy = trainer.strategy
    # Full weights on rank 0 (FSDP gathers them from the shards).
    state = strategy.full_state_dict() if isinstance(strategy, ShardedFSDPStrategy) else strategy.lightning_module_state_dict()
    summary: dict[str, Any] = {
        "steps": trainer.global_step,
        "train_tokens": trainer.global_step * tokens_per_step,
        "tokens_per_s": monitor.mean_tokens_per_s(),
        "resumed_from_step": resume.step if resume else 0,
    }
    if monitor.train:
        summary["train_loss"] = monitor.train[-1][1]
    if monitor.val:
        summary["val_loss"], summary["val_bpb"] = monitor.val[-1][1], monitor.val[-1][2]
    if "perf/mfu" in monitor.last:
        summary["mfu"] = monitor.last["perf/mfu"]
    if not trainer.is_global_zero:
        return summary
    summary["unigram_entropy"] = unigram_entropy(train_split.tokens, gpt_cfg.vocab_size)
    summary["parameters"] = module.model.num_parameters()
    summary["artifacts"] = export(cfg, paths, gpt_cfg, state, meta, summary, monitor)
    return summary


def _quiet_lightning() -> None:
    """Lightning's start-up banners (GPU available, tips) and a deprecation notice from its own
    pytree helper are noise in a stage log; warnings and errors still come through."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def build_trainer(cfg: PretrainConfig, callbacks: list[Callback], checkpoint_dir: Path | None = None) -> L.Trainer:
    """A Trainer stripped to what the stage uses: no Lightning logger, progress bar, model summary,
    checkpointing or validation loop (the stage's callbacks do those without per-step cost).

    With ``checkpoint_dir`` (the pretrain run's checkpoint directory): it is Lightning's root, where
    under SLURM Lightning would load ``hpc_ckpt_N.ckpt`` by itself, so the stage keeps it free of
    files it has not checked; Lightning's SLURM auto-requeue is off (:class:`PeriodicCheckpoint`
    requeues); FSDP saves sharded checkpoints (:class:`ShardedFSDPStrategy`). Without it (the
    fine-tune and distill stages) FSDP gathers full checkpoints on rank 0.
    """
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    use_cuda = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16-mixed" if use_cuda and torch.cuda.is_bf16_supported() else "32-true"
    if use_cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for whatever still runs in fp32
    strategy: Any = cfg.strategy
    if cfg.strategy == "ddp":
        import inspect

        from lightning.pytorch.strategies import DDPStrategy
        from torch.nn.parallel import DistributedDataParallel

        # The model's only buffers are constant position tables: no need to broadcast them every
        # step (the flag was renamed in torch 2.13).
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        ddp_kwargs: dict[str, Any] = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
        strategy = DDPStrategy(**ddp_kwargs)
    elif cfg.strategy == "fsdp":
        if checkpoint_dir is not None:
            strategy = ShardedFSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True)
        else:
            from lightning.pytorch.strategies import FSDPStrategy

            strategy = FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full", use_orig_params=True)
    plugins: list[Any] = [AtomicCheckpointIO()]
    if checkpoint_dir is not None and SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(
        accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=strategy,
        precision=precision, max_steps=cfg.max_steps, max_epochs=-1, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=callbacks, plugins=plugins,
        deterministic=cfg.deterministic, use_distributed_sampler=False, default_root_dir=checkpoint_dir,
    )


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


def peak_flops(trainer: L.Trainer) -> float | None:
    """Datasheet bf16 peak of the GPU in use, when training in bf16 on one we know."""
    if trainer.strategy.root_device.type != "cuda" or "bf16" not in str(trainer.precision):
        return None
    name = torch.cuda.get_device_name(trainer.strategy.root_device)
    return next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), None)


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


def _stage_callbacks(cfg: PretrainConfig, paths: Paths, meta: dict[str, Any], datamodule: TokenDataModule,
                     monitor: TrainingMonitor, tracker: AsyncTracker, tokens_per_byte: float | None,
                     ckpt_dir: Path) -> list[Callback]:
    callbacks: list[Callback] = [Validation(
        every=cfg.val_every, tokens_per_byte=tokens_per_byte, monitor=monitor,
        batches=lambda rank, world: datamodule.val_batches(cfg.val_batches, rank, world),
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
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    callbacks.append(PeriodicCheckpoint(ckpt_dir, cfg.checkpoint_every, cfg.keep_checkpoints,
                                        requeue=SLURMEnvironment.detect()))
    if cfg.progress:
        callbacks.append(StepProgress(monitor))
    return callbacks


def export(cfg: PretrainConfig, paths: Paths, gpt_cfg: GPTConfig, state: dict[str, torch.Tensor],
           meta: dict[str, Any], summary: dict[str, Any], monitor: TrainingMonitor) -> list[str]:
    """Write the model directory, metrics JSON and loss curve; return the artifact paths."""
    model = GPT(gpt_cfg)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    numbers = {k: v for k, v in summary.items() if isinstance(v, int | float)}
    model_dir = paths.models / "pretrain"
    with atomic_dir(model_dir) as tmp:
        save_model(model, tmp, extra={
            "tokenizer_fingerprint": meta["tokenizer_fingerprint"], "eos_id": meta["eos_id"],
            "objective": cfg.objective, "training": numbers,
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
    write_bytes(png_path, loss_plot(monitor, summary.get("unigram_entropy")))
    return [str(model_dir), str(metrics_path), str(csv_path), str(png_path)]


def loss_plot(monitor: TrainingMonitor, unigram: float | None) -> bytes:
    """PNG of train and val loss against step, with the unigram entropy as a reference line."""
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
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
