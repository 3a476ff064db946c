"""The ``register`` stage against a local SQLite MLflow store: registration, lineage tags, the
gate on a first and a worse model, manual promote / rollback, and refusals."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from lmpipe.config import Paths
from lmpipe.errors import ConfigError, DataError, FingerprintMismatch
from lmpipe.io import write_json
from lmpipe.registry import register
from lmpipe.registry.config import RegisterConfig
from lmpipe.registry.promote import RegistryError, promote, rollback
from lmpipe.tokenizer.shards import unigram_bits_per_byte


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def aliases_of(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def pretrain_only(prefix: str) -> RegisterConfig:
    return RegisterConfig.model_validate({
        "name_prefix": prefix, "models": [{"stage": "pretrain", "metrics": {"val_bpb": "metrics/pretrain.json:val_bpb"}}],
        "gate": {"val_bpb": {"direction": "lower", "min_improvement": 0.0}},
    })


def git_commit_all(root: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (root / "README.md").write_text("project\n")
    git("add", "README.md")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "init")
    return git("rev-parse", "HEAD")


def write_lineage_inputs(paths: Paths, register_md5: str) -> None:
    assert (paths.tokens / "meta.json").is_file()  # the tokenize stage's, from the fixture
    lock = {"schema": "2.0", "stages": {
        "tokenize": {"cmd": "lmpipe tokenize", "outs": [{"path": "data/tokens", "md5": "abc.dir"}]},
        "register": {"cmd": "lmpipe register", "outs": [{"path": "metrics/register.json", "md5": register_md5}]},
    }}
    (paths.root / "dvc.lock").write_text(yaml.safe_dump(lock))


@pytest.mark.slow
def test_first_model_is_champion_and_a_worse_one_leaves_it(project: Paths, sqlite_store: str, models: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's registration run twice: the first model is promoted; a deliberately worse
    second candidate leaves champion where it was, and the reason is returned and recorded."""
    commit = git_commit_all(project.root)
    write_lineage_inputs(project, register_md5="1")
    client = MlflowClient()
    mlflow.set_experiment("lmpipe")
    parent = client.create_run(mlflow.get_experiment_by_name("lmpipe").experiment_id).info.run_id
    monkeypatch.setenv("LMPIPE_PARENT_RUN_ID", parent)
    cfg = pretrain_only("first")
    name = "first-pretrain"

    models.pretrain(project, seed=0, val_bpb=1.50)
    summary = register.run(cfg, project)
    assert summary["registered"] == 1 and summary["promoted"] == 1 and summary[f"{name}/version"] == 1
    assert aliases_of(client, name) == {"candidate": "1", "champion": "1"}
    v1 = client.get_model_version(name, "1")
    tags = v1.tags
    assert tags["lmpipe.git_commit"] == commit and tags["lmpipe.git_dirty"] == "false"
    assert tags["lmpipe.tokenizer_fingerprint"] == read_json(project.tokenizer / "tokenizer.json")["fingerprint"]
    assert tags["lmpipe.data_fingerprint"] == hashlib.sha256((project.tokens / "meta.json").read_bytes()).hexdigest()
    assert tags["lmpipe.pipeline_run_id"] == parent
    assert tags["lmpipe.metric.val_bpb"] == "1.5" and tags["lmpipe.promote"] == "passed"
    assert client.get_run(tags["lmpipe.run_id"]).data.tags["mlflow.parentRunId"] != ""
    dvc_fp = tags["lmpipe.dvc_fingerprint"]
    assert len(dvc_fp) == 64

    write_lineage_inputs(project, register_md5="2")  # only the register stage's own lock entry changed
    models.pretrain(project, seed=1, val_bpb=1.90)  # deliberately worse
    summary = register.run(cfg, project)
    assert summary[f"{name}/version"] == 2 and summary["promoted"] == 0
    aliases = aliases_of(client, name)
    assert aliases == {"candidate": "2", "champion": "1"}, "the worse candidate must not move champion"
    report = read_json(project.metrics / "register.json")["models"][0]
    assert report["gate"]["passed"] is False and report["champion"] == 1
    assert "val_bpb 1.9 vs champion 1.5" in report["gate"]["message"] and "worse by 0.4" in report["gate"]["message"]
    v2 = client.get_model_version(name, "2")
    assert v2.tags["lmpipe.promote"] == "failed" and "worse" in v2.tags["lmpipe.promote_reason"]
    assert v2.tags["lmpipe.dvc_fingerprint"] == dvc_fp

    # People: the same gate by hand, then forced, then a rollback to the previous champion.
    decision = promote(name, 2, cfg=cfg)
    assert not decision.moved and aliases_of(client, name)["champion"] == "1"
    decision = promote(name, 2, cfg=cfg, force=True)
    assert decision.moved and decision.forced
    assert aliases_of(client, name) == {"candidate": "2", "champion": "2", "previous": "1"}
    assert client.get_model_version(name, "2").tags["lmpipe.promote"] == "forced"
    decision = rollback(name)
    assert decision.moved and decision.version == 1
    assert aliases_of(client, name) == {"candidate": "2", "champion": "1"}
    assert client.get_model_version(name, "2").tags["lmpipe.rolled_back"] == "true"
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(name)
    with pytest.raises(RegistryError, match="has no version 7"):
        promote(name, 7, cfg=cfg)


@pytest.mark.slow
def test_unchanged_model_is_not_registered_again(project: Paths, sqlite_store: str, models: Any) -> None:
    """DVC reruns register when any one model changes; the others keep their version and aliases."""
    cfg = pretrain_only("same")
    name = "same-pretrain"
    models.pretrain(project, seed=0, val_bpb=1.50)
    assert register.run(cfg, project)["registered"] == 1
    summary = register.run(cfg, project)
    assert summary["registered"] == 0 and summary[f"{name}/version"] == 1
    assert [str(v.version) for v in MlflowClient().search_model_versions(f"name='{name}'")] == ["1"]
    entry = read_json(project.metrics / "register.json")["models"][0]
    assert entry["unchanged"] is True and entry["champion"] == 1
    models.pretrain(project, seed=1, val_bpb=1.40)  # a new model: a new version, and the gate runs
    summary = register.run(cfg, project)
    assert summary["registered"] == 1 and summary["promoted"] == 1 and summary[f"{name}/version"] == 2


def test_logged_model_carries_gate_and_evaluation_metrics(project: Paths, sqlite_store: str, models: Any) -> None:
    """The Models tab shows numbers: the registered version's LoggedModel holds the gate metric and
    the evaluate stage's scores of that model directory (not those of another model)."""
    models.pretrain(project, seed=0, val_bpb=1.25)
    write_json(project.reports / "evaluation.json", {
        "models": {
            "teacher": {"path": "models/pretrain", "lm": {"val": {"loss": 2.5, "perplexity": 12.2, "bpb": 1.25,
                                                                  "tokens": 900}},
                        "speed": {"tokens_per_s_b1": 410.0}},
            "student": {"path": "models/distill", "lm": {"val": {"loss": 9.0, "perplexity": 8103.1, "bpb": 4.0}}},
        },
        "instruction": {"sft": {"path": "models/finetune/sft", "bleu": 3.0, "rouge_l": 0.2, "exact_match": 0.0}},
    })
    register.run(pretrain_only("logged"), project)
    client = MlflowClient()
    version = client.get_model_version("logged-pretrain", "1")
    assert version.source.startswith("models:/m-")  # the version is the LoggedModel it was registered from
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.name == "logged-pretrain"  # listed in the Models tab by its registered name
    assert read_json(project.metrics / "register.json")["models"][0]["model_id"] == logged.model_id
    metrics = {m.key: m.value for m in logged.metrics}
    assert metrics == {"val_bpb": 1.25, "eval/val/loss": 2.5, "eval/val/perplexity": 12.2, "eval/val/bpb": 1.25,
                       "eval/speed/tokens_per_s_b1": 410.0}
    run_metrics = client.get_run(version.run_id).data.metrics
    assert run_metrics["val_bpb"] == 1.25 and run_metrics["eval/val/bpb"] == 1.25


def test_evaluation_file_that_is_not_json_names_the_file(project: Paths, models: Any) -> None:
    models.pretrain(project, seed=0, val_bpb=1.0)
    (project.reports).mkdir(parents=True, exist_ok=True)
    (project.reports / "evaluation.json").write_text("{oops")
    with pytest.raises(DataError, match=r"evaluation\.json: not valid JSON"):
        register.run(pretrain_only("badeval"), project)


def test_model_without_its_metric_is_registered_but_never_promoted(project: Paths, sqlite_store: str, models: Any) -> None:
    models.pretrain(project, seed=0, val_bpb=None)  # metrics/pretrain.json has no val_bpb
    summary = register.run(pretrain_only("nometric"), project)
    assert summary["registered"] == 1 and summary["promoted"] == 0
    model = MlflowClient()
    assert aliases_of(model, "nometric-pretrain") == {"candidate": "1"}
    entry = read_json(project.metrics / "register.json")["models"][0]
    assert "candidate val_bpb is missing" in entry["gate"]["message"]
    assert entry["metric_problems"] == ["val_bpb: no key 'val_bpb' in metrics/pretrain.json"]


def test_model_from_another_tokenizer_is_refused(project: Paths, models: Any) -> None:
    models.pretrain(project, seed=0, val_bpb=1.0)
    config_path = project.models / "pretrain" / "config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_fingerprint"] = "0" * 64
    config_path.write_text(json.dumps(config))
    models.seal(project.models / "pretrain", "pretrain")
    with pytest.raises(FingerprintMismatch, match="trained with tokenizer 000000000000"):
        register.run(pretrain_only("wrongtok"), project)


def test_masked_lm_and_missing_models_are_clear_errors(project: Paths, models: Any) -> None:
    with pytest.raises(DataError, match="no model directory"):
        register.run(pretrain_only("missing"), project)
    models.pretrain(project, seed=0, val_bpb=1.0, bidirectional=True)
    (project.models / "pretrain" / "manifest.json").unlink()  # refused from config.json, before anything else
    with pytest.raises(ConfigError, match=r"register.models: .*pretrain was pretrained as a masked LM .*a served "
                                          r"generate or chat model writes text left to right"):
        register.run(pretrain_only("mlm"), project)


def test_corrupt_metrics_file_names_the_file(project: Paths, models: Any) -> None:
    models.pretrain(project, seed=0, val_bpb=1.0)
    (project.metrics / "pretrain.json").write_text("{not json")
    with pytest.raises(DataError, match=r"pretrain\.json: not valid JSON"):
        register.run(pretrain_only("corrupt"), project)


def test_model_dir_without_a_valid_manifest_is_refused(project: Paths, models: Any) -> None:
    """The manifest is the proof that a training stage wrote the directory as it is now."""
    models.pretrain(project, seed=0, val_bpb=1.0)
    model_dir = project.models / "pretrain"
    manifest = read_json(model_dir / "manifest.json")
    (model_dir / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.json"):
        register.run(pretrain_only("nomanifest"), project)
    del manifest["files"]["model.safetensors"]
    write_json(model_dir / "manifest.json", manifest)
    with pytest.raises(DataError, match="does not list model.safetensors"):
        register.run(pretrain_only("nomanifest"), project)
    models.seal(model_dir, "pretrain")
    config = read_json(model_dir / "config.json")
    config["training"] = {"edited": True}  # changed after the stage wrote it
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="sha256 differs from manifest: config.json"):
        register.run(pretrain_only("nomanifest"), project)


def test_first_model_must_beat_the_unigram_floor(project: Paths, sqlite_store: str, models: Any) -> None:
    """A first version is registered but not champion when its val_bpb is above the unigram
    entropy of the val shards in bits per byte; one below it becomes champion."""
    floor = unigram_bits_per_byte(project.tokens, "val", project.tokenizer)
    assert 1.0 < floor < 9.0
    cfg = pretrain_only("floor")
    models.pretrain(project, seed=0, val_bpb=9.0)
    summary = register.run(cfg, project)
    assert summary["registered"] == 1 and summary["promoted"] == 0
    client = MlflowClient()
    assert aliases_of(client, "floor-pretrain") == {"candidate": "1"}
    assert float(client.get_model_version("floor-pretrain", "1").tags["lmpipe.floor.val_bpb"]) == pytest.approx(floor)
    entry = read_json(project.metrics / "register.json")["models"][0]
    assert "val_bpb 9 does not beat the absolute floor" in entry["gate"]["message"]
    models.pretrain(project, seed=1, val_bpb=floor - 0.5)
    summary = register.run(cfg, project)
    assert summary["promoted"] == 1 and aliases_of(client, "floor-pretrain")["champion"] == "2"


def test_classifier_without_a_majority_floor_is_not_a_first_champion(project: Paths, sqlite_store: str,
                                                                     models: Any) -> None:
    cfg = RegisterConfig.model_validate({
        "name_prefix": "major", "models": [{"stage": "finetune", "task": "cls",
                                            "metrics": {"accuracy": "metrics/finetune_cls.json:test_accuracy"}}]})
    models.classifier(project, accuracy=0.55, majority=0.6)  # worse than always answering the majority
    assert register.run(cfg, project)["promoted"] == 0
    entry = read_json(project.metrics / "register.json")["models"][0]
    assert "accuracy 0.55 does not beat the absolute floor 0.6" in entry["gate"]["message"]


@pytest.mark.slow
def test_version_that_failed_its_smoke_test_is_not_counted_as_registered(project: Paths, sqlite_store: str,
                                                                        models: Any) -> None:
    """A classifier whose head does not fit its labels loads in lmpipe but not as a served model:
    registration fails, the version is marked, and a retry registers (and fails) again instead of
    reporting the model as already registered."""
    cfg = RegisterConfig.model_validate({
        "name_prefix": "smoke", "models": [{"stage": "finetune", "task": "cls",
                                            "metrics": {"accuracy": "metrics/finetune_cls.json:test_accuracy"}}]})
    models.classifier(project, head_outputs=3)
    client = MlflowClient()
    for attempt in (1, 2):
        with pytest.raises(DataError, match="does not load and predict"):
            register.run(cfg, project)
        version = client.get_model_version("smoke-finetune-cls", str(attempt))
        assert version.tags["lmpipe.smoke"] == "failed" and "lmpipe.model_fingerprint" not in version.tags
    assert aliases_of(client, "smoke-finetune-cls") == {}
    models.classifier(project)  # fixed: registered as a new version, smoke-tested and promoted
    summary = register.run(cfg, project)
    assert summary["registered"] == 1 and summary["smoke-finetune-cls/version"] == 3 and summary["promoted"] == 1
    assert client.get_model_version("smoke-finetune-cls", "3").tags["lmpipe.smoke"] == "passed"
