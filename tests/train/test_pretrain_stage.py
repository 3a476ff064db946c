"""The pretrain stage end to end on a tiny model: outputs, MLflow logging, guards, objectives."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lmpipe.config import Paths, TrackingConfig
from lmpipe.errors import ConfigError
from lmpipe.io import verify_manifest
from lmpipe.model import load_model
from lmpipe.train.callbacks import DivergenceGuard, TrainingDiverged
from lmpipe.train.data import write_synthetic_shards
from lmpipe.train.module import learning_rate
from lmpipe.train.pretrain.config import PretrainConfig
from lmpipe.train.pretrain.stage import train

TINY = {"model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 16}, "micro_batch_size": 8,
        "warmup_steps": 5, "eval_batches": 4, "sample_tokens": 8, "progress": False}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    write_synthetic_shards(tmp_path / "data" / "tokens", vocab_size=40, train_tokens=4000, val_tokens=600)
    return Paths(tmp_path)


def config(**overrides: Any) -> PretrainConfig:
    return PretrainConfig.model_validate({**TINY, **overrides})


def test_stage_trains_below_unigram_entropy_writes_outputs_and_logs_to_mlflow(paths: Paths) -> None:
    import mlflow

    from lmpipe.tracking import stage_run, tracking_uri

    cfg = config(max_steps=60, lr=1e-2, log_every=10, eval_every=20, checkpoint_every=20)
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{paths.root / 'mlflow.db'}")
    with stage_run("pretrain", tracking, paths.root) as run:
        summary = train(cfg, paths)
    assert summary["steps"] == 60 and summary["resumed_from_step"] == 0
    assert summary["val_loss"] < 0.5 * summary["unigram_entropy"]  # learnt the runs, not just frequencies
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / 3 / math.log(2))
    metrics = json.loads((paths.metrics / "pretrain.json").read_text())
    assert metrics["val_loss"] == summary["val_loss"] and metrics["tokens_per_s"] > 0
    rows = (paths.plots / "pretrain_loss.csv").read_text().splitlines()
    assert rows[0] == "step,train_loss,val_loss" and len(rows) == 7
    assert rows[2].startswith("20,") and rows[2].split(",")[2]  # val loss at step 20
    assert (paths.plots / "pretrain_loss.png").read_bytes()[:4] == b"\x89PNG"
    verify_manifest(paths.models / "pretrain")
    model, info = load_model(paths.models / "pretrain")
    assert info["tokenizer_fingerprint"] == "synthetic" and model.config.vocab_size == 40

    client = mlflow.MlflowClient(tracking_uri(tracking, paths.root))  # MLFLOW_TRACKING_URI may win
    history = client.get_metric_history(run.run_id, "train/loss")
    assert [m.step for m in history] == [10, 20, 30, 40, 50, 60]
    assert [m.step for m in client.get_metric_history(run.run_id, "val/loss")] == [20, 40, 60]
    assert client.get_run(run.run_id).data.params["resolved.accumulation"] == "1"
    samples = mlflow.load_table("samples.json", run_ids=[run.run_id])  # one row per prompt (no tokenizer: one)
    assert samples["step"].tolist() == [60] and samples["sample"].tolist() == [0]
    assert set(samples.columns) >= {"prompt", "text"}

    # The same config again finds the finished run's last checkpoint and does not retrain.
    again = train(cfg, paths)
    assert again["resumed_from_step"] == 60 and again["val_loss"] == summary["val_loss"]


class PoisonWeights(Callback):
    """Puts a NaN into the weights after step ``at``, as an overflow would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                pl_module.model.wte.weight[0, 0] = float("nan")


def test_nan_loss_stops_training_without_a_nan_checkpoint(paths: Paths) -> None:
    cfg = config(max_steps=20, log_every=1, checkpoint_every=2)
    with pytest.raises(TrainingDiverged, match="train loss is nan at step 4"):
        train(cfg, paths, extra_callbacks=[PoisonWeights(at=3)])
    saved = sorted(p.name for p in paths.checkpoints.glob("pretrain/*/*.ckpt"))
    assert saved == ["step-00000002.ckpt"]
    state = torch.load(paths.checkpoints.glob("pretrain/*/step-00000002.ckpt").__next__(), weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())
    assert not (paths.models / "pretrain").exists()


def test_divergence_guard_spots_spikes_after_warmup() -> None:
    guard = DivergenceGuard(spike_factor=3.0, warmup_steps=2)
    guard.check(1, 50.0)  # warmup: anything finite goes
    for step in range(2, 10):
        guard.check(step, 2.0)
    with pytest.raises(TrainingDiverged, match="spiked"):
        guard.check(10, 30.0)
    with pytest.raises(TrainingDiverged, match="inf"):
        DivergenceGuard(0.0, 0).check(1, float("inf"))


def test_mlm_objective_trains_a_bidirectional_model(paths: Paths) -> None:
    with pytest.raises(ConfigError, match="mask_token_id"):
        train(config(objective="mlm", max_steps=2), paths)
    summary = train(config(objective="mlm", mask_token_id=39, max_steps=6, eval_every=3), paths)
    assert summary["steps"] == 6 and math.isfinite(summary["val_loss"])
    model, info = load_model(paths.models / "pretrain")
    assert info["objective"] == "mlm" and model.config.bidirectional


def test_muon_with_the_recipe_options_trains_one_global_step_per_step_and_checkpoints_both_optimizers(
        paths: Paths) -> None:
    model = {**TINY["model"], "qk_norm": True, "mlp": "relu2", "embed_scale": True, "tie_weights": False}
    cfg = config(model=model, optimizer="muon", muon_lr=0.03, muon_ns_steps=3, lr=1e-2, max_steps=12, log_every=1,
                 eval_every=0, checkpoint_every=6, sample_tokens=0)
    summary = train(cfg, paths)
    rows = (paths.plots / "pretrain_loss.csv").read_text().splitlines()[1:]
    losses = [float(row.split(",")[1]) for row in rows]
    # Lightning counts each wrapped optimizer's step as a global step: were Muon stepped through its
    # wrapper too, 12 "steps" would be 6 updates, logged at steps 2, 4, ... 12.
    assert summary["steps"] == 12 and [int(row.split(",")[0]) for row in rows] == list(range(1, 13))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.5, losses
    state = torch.load(next(paths.checkpoints.glob("pretrain/*/step-00000006.ckpt")), weights_only=True)
    adamw, muon = state["optimizer_states"]
    assert all("momentum_buffer" in v for v in muon["state"].values()) and len(muon["state"]) == 2 * 4
    assert all("exp_avg" in v for v in adamw["state"].values())
    # One schedule, two peaks: Muon's learning rate is lr's scaled to muon_lr.
    assert muon["param_groups"][0]["lr"] == pytest.approx(adamw["param_groups"][0]["lr"] * 0.03 / 1e-2)
    assert muon["param_groups"][0]["ns_steps"] == 3
    model_out, _ = load_model(paths.models / "pretrain")
    assert model_out.config.qk_norm and model_out.config.mlp == "relu2" and not model_out.config.tie_weights


def test_tokens_per_step_must_fit_the_micro_batches(paths: Paths) -> None:
    with pytest.raises(ConfigError, match="multiple of micro_batch_size x block_size x devices = 8 x 16 x 1"):
        train(config(tokens_per_step=1000, max_steps=2), paths)


def test_config_rejects_impossible_models() -> None:
    with pytest.raises(ValueError, match="model: n_embd .* divisible by n_head"):
        PretrainConfig.model_validate({"model": {"n_embd": 100, "n_head": 3}})
    with pytest.raises(ValueError, match="unknown 'huge'"):
        PretrainConfig.model_validate({"preset": "huge"})
    with pytest.raises(ValueError, match="muon orthogonalises each whole weight matrix, which strategy fsdp shards"):
        PretrainConfig.model_validate({"optimizer": "muon", "strategy": "fsdp"})


def test_learning_rate_schedules() -> None:
    cosine = config(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert learning_rate(0, cosine) == pytest.approx(0.1)
    assert learning_rate(9, cosine) == pytest.approx(1.0)
    assert learning_rate(60, cosine) == pytest.approx(0.55)
    assert learning_rate(110, cosine) == pytest.approx(0.1)
    wsd = config(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, max_steps=100, schedule="wsd", decay_fraction=0.2)
    assert learning_rate(79, wsd) == 1.0
    assert learning_rate(85, wsd) == pytest.approx(1 - math.sqrt(5 / 20))
    assert learning_rate(100, wsd) == 0.0
    # With max_time, the decay follows whichever of steps and elapsed time is further along.
    assert learning_rate(20, wsd, time_fraction=0.7) == 1.0
    assert learning_rate(20, wsd, time_fraction=0.85) == pytest.approx(1 - math.sqrt(0.25))
    assert learning_rate(85, wsd, time_fraction=0.1) == pytest.approx(1 - math.sqrt(5 / 20))
    assert learning_rate(20, cosine, time_fraction=0.5) == pytest.approx(0.55)
    assert learning_rate(5, cosine, time_fraction=0.9) == pytest.approx(0.6)  # warmup stays in steps


def test_samples_are_decoded_with_the_tokenizer_stage_model(paths: Paths, caplog: pytest.LogCaptureFixture) -> None:
    import io
    import logging

    import sentencepiece as spm

    from lmpipe.io import sha256_file

    model = io.BytesIO()
    text = ["the cat sat on the mat", "a dog ran in the fog", "once upon a time there was a tiny model"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=40,
                                   model_type="char", eos_id=0, unk_id=1, bos_id=-1, pad_id=-1)
    paths.tokenizer.mkdir(parents=True)
    (paths.tokenizer / "tokenizer.model").write_bytes(model.getvalue())
    fingerprint = sha256_file(paths.tokenizer / "tokenizer.model")
    (paths.tokenizer / "tokenizer.json").write_text(json.dumps({
        "fingerprint": fingerprint, "vocab_size": 40, "model_type": "char", "special_tokens": {},
        "special_ids": {"unk": 1, "bos": -1, "eos": 0, "pad": -1}}))
    meta = json.loads((paths.tokens / "meta.json").read_text())
    (paths.tokens / "meta.json").write_text(json.dumps({**meta, "tokenizer_fingerprint": fingerprint}))
    caplog.set_level(logging.INFO, logger="lmpipe.train.callbacks")
    train(config(max_steps=4, sample_prompts=["once upon"], sample_tokens=6), paths)
    sample = caplog.text.split("--- sample 0\n")[1]
    assert sample.startswith("once upon")
    assert json.loads((paths.models / "pretrain" / "config.json").read_text())["tokenizer_fingerprint"] == fingerprint


def test_progress_off_a_terminal_is_plain_lines_with_loss_rate_and_eta(
        paths: Paths, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    monkeypatch.setenv("LMPIPE_PROGRESS_SECONDS", "0.001")  # a line at every step
    caplog.set_level(logging.INFO, logger="lmpipe.progress")
    train(config(max_steps=6, log_every=2, eval_every=0, sample_tokens=0, progress=True), paths)
    lines = [m for m in caplog.messages if m.startswith("pretrain: ")]
    assert len(lines) >= 3 and lines[-1].startswith("pretrain: 6/6 steps (100%)"), lines
    assert any("loss " in line and " tok/s" in line and "ETA " in line for line in lines), lines


def test_max_time_ends_training_inside_the_budget_with_the_decay_done_and_resumes_the_rest(paths: Paths) -> None:
    import time

    cfg = config(max_steps=10**6, max_time=6.0, lr=1e-2, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.3,
                 log_every=50, eval_every=100, checkpoint_every=0)
    started = time.monotonic()
    summary = train(cfg, paths)
    took = time.monotonic() - started
    assert 6.0 * 0.6 < took < 6.0 + 3.0  # setup and export are outside the budget, the rest inside
    last = torch.load(next(paths.checkpoints.glob("pretrain/*/last.ckpt")), weights_only=True)
    budget = next(state for key, state in last["callbacks"].items() if "TimeBudget" in key)
    assert budget["time_elapsed"]["train"] <= 6.0 + 0.25  # the final evaluation and samples included
    assert last["global_step"] == summary["steps"] > 100
    # the wsd floor (1e-3, decay from 1e-2): exactly when the last step was planned as the last; a
    # step slower than the ones before it ends the budget one step early, a few percent above it
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-3, rel=0.05)
    metrics = json.loads((paths.metrics / "pretrain.json").read_text())
    assert metrics["steps"] == summary["steps"] and math.isfinite(metrics["val_loss"])
    rows = (paths.plots / "pretrain_loss.csv").read_text().splitlines()
    assert rows[-1].startswith(f"{summary['steps']},") and rows[-1].split(",")[2]  # evaluated at the last step

    # A rerun resumes the spent budget: nothing is left to train.
    again = train(cfg, paths)
    assert again["resumed_from_step"] == again["steps"] == summary["steps"]


class ScrambleEmbeddings(Callback):
    """From step ``after`` + 1 on, rolls the (tied) embedding rows by one at every step, as a run
    that has stopped generalising would: the val loss after ``after`` gets worse and stays finite."""

    def __init__(self, after: int, fail_at: int = 0) -> None:
        self.after, self.fail_at = after, fail_at
        self.weights_at_after: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.after:
            self.weights_at_after = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        elif step > self.after:
            with torch.no_grad():
                pl_module.model.wte.weight.copy_(pl_module.model.wte.weight.roll(1, dims=0))
        if self.fail_at and step == self.fail_at:
            raise RuntimeError("stopped from outside")


def val_losses(paths: Paths) -> dict[int, float]:
    rows = [r.split(",") for r in (paths.plots / "pretrain_loss.csv").read_text().splitlines()[1:]]
    return {int(step): float(val) for step, _, val in rows if val}


SCRAMBLED = {"max_steps": 40, "lr": 1e-2, "eval_every": 10, "checkpoint_every": 10, "spike_factor": 0.0,
             "sample_tokens": 0}


def test_export_weights_best_exports_the_evaluation_with_the_lowest_val_loss(paths: Paths) -> None:
    scramble = ScrambleEmbeddings(after=20)
    summary = train(config(**SCRAMBLED), paths, extra_callbacks=[scramble])
    losses = val_losses(paths)
    assert sorted(losses) == [10, 20, 30, 40] and min(losses, key=losses.__getitem__) == 20
    assert summary["steps"] == 40 and summary["export_step"] == 20 and summary["stopped_early"] == 0
    assert summary["val_loss"] == losses[20] < losses[40]
    metrics = json.loads((paths.metrics / "pretrain.json").read_text())
    assert metrics["export_step"] == 20 and metrics["val_loss"] == losses[20]
    model, _ = load_model(paths.models / "pretrain")
    exported = model.state_dict()
    assert exported.keys() == scramble.weights_at_after.keys()
    assert all(torch.equal(exported[k], scramble.weights_at_after[k]) for k in exported)


def test_export_weights_last_exports_the_last_step(paths: Paths) -> None:
    final: dict[str, torch.Tensor] = {}

    class KeepFinal(Callback):
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            final.update({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})

    summary = train(config(**SCRAMBLED, export_weights="last"), paths,
                    extra_callbacks=[ScrambleEmbeddings(after=20), KeepFinal()])
    assert summary["export_step"] == 40 and summary["val_loss"] == val_losses(paths)[40]
    exported = load_model(paths.models / "pretrain")[0].state_dict()
    assert all(torch.equal(exported[k], final[k]) for k in exported)


def test_patience_stops_on_the_val_loss_and_a_resumed_run_keeps_the_best_weights(paths: Paths) -> None:
    cfg = config(**{**SCRAMBLED, "max_steps": 60}, patience=2)
    scramble = ScrambleEmbeddings(after=20, fail_at=25)
    with pytest.raises(RuntimeError, match="stopped from outside"):
        train(cfg, paths, extra_callbacks=[scramble])
    best = scramble.weights_at_after
    # The rerun resumes from the step-20 checkpoint, which holds the best weights: step 20 is
    # never evaluated again, yet it is what gets exported.
    summary = train(cfg, paths, extra_callbacks=[ScrambleEmbeddings(after=20)])
    assert summary["resumed_from_step"] == 20
    assert summary["steps"] == 40 and summary["stopped_early"] == 1  # steps 30 and 40 did not improve
    assert summary["export_step"] == 20
    exported = load_model(paths.models / "pretrain")[0].state_dict()
    assert all(torch.equal(exported[k], best[k]) for k in exported)
    # Run again: the stopped run is finished and trains no further.
    again = train(cfg, paths)
    assert again["resumed_from_step"] == 40 and again["steps"] == 40 and again["export_step"] == 20


def test_best_weights_counts_only_improvements_larger_than_min_delta() -> None:
    from types import SimpleNamespace

    from lmpipe.train.callbacks import BestWeights

    trainer: Any = SimpleNamespace(should_stop=False)
    selection = BestWeights(monitor="accuracy", mode="max", patience=2, min_delta=0.01)
    for step, value in ((10, 0.5), (20, 0.505), (30, 0.6), (40, 0.605)):
        selection.offer(trainer, step, {"accuracy": value}, lambda v=value: {"w": torch.tensor(v)})
    assert selection.best == {"step": 30.0, "accuracy": 0.6} and float(selection.state["w"]) == pytest.approx(0.6)
    assert selection.bad_evaluations == 1 and not trainer.should_stop
    selection.offer(trainer, 50, {"accuracy": 0.3}, dict)
    assert selection.stopped and trainer.should_stop
    restored = BestWeights(monitor="accuracy", mode="max", patience=2, min_delta=0.01)
    restored.load_state_dict(selection.state_dict())
    assert restored.best == selection.best and restored.stopped and restored.bad_evaluations == 2
