"""The stage registry: the one list of lmpipe's stages that everything else derives from.

The CLI's subcommands and their ``--help``, the config sections ``params.yaml`` may hold, the
Prefect flow's stage order and network retries, where each stage writes, and the code deps of
every stage in ``dvc.yaml`` (``lmpipe lineage``) all read this table. It imports nothing from
lmpipe and names modules and classes as strings, so reading it costs nothing and a stage imports
only the code it runs: ``lmpipe clean`` never loads model or training code.

Adding a stage: one :class:`StageSpec` here, its ``run(cfg, paths)`` in ``module``, its config
model in ``config``, and a stage in ``dvc.yaml`` (``lmpipe lineage --write`` fills in its code deps).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage.

    ``module`` holds ``run(cfg, paths) -> summary`` (and ``run_task`` for a stage with tasks);
    ``config`` is ``"module:Class"`` of its params section (None: a stage that reads the sections
    of others); ``outs`` are its outputs relative to the project root (``{task}`` stands for a task
    of a ``foreach`` stage); ``inputs`` says it reads data files named in its params, which the
    ``inputs`` stage fingerprints into ``data/inputs/<stage>[/<task>].json``; ``network`` marks
    stages that download or talk to a server and get retries in the flow; ``resources`` are
    non-Python files the stage reads from the source tree.
    """

    name: str
    module: str
    config: str | None
    help: str
    outs: tuple[str, ...] = ()
    inputs: bool = False
    tasks: str | None = None
    network: bool = False
    resources: tuple[str, ...] = ()

    @property
    def section(self) -> str | None:
        return self.name if self.config else None

    def config_module(self) -> str | None:
        return self.config.partition(":")[0] if self.config else None


# Pipeline order. The ``inputs`` stage comes first: DVC runs it on every ``dvc repro``
# (always_changed) and everything that reads files named in params depends on its small outputs.
STAGE_LIST: tuple[StageSpec, ...] = (
    StageSpec("inputs", "lmpipe.lineage", None,
              "Fingerprint every file and dataset named in params (sources, eval and fine-tune data) into data/inputs/.",
              outs=("data/inputs",)),
    StageSpec("collect", "lmpipe.data.collect", "lmpipe.data.config:CollectConfig",
              "Gather text from sources into data/raw/.", outs=("data/raw",), inputs=True, network=True),
    StageSpec("clean", "lmpipe.data.clean", "lmpipe.data.config:CleanConfig",
              "Filter, redact and deduplicate data/raw/ into data/clean/.", outs=("data/clean",), inputs=True),
    StageSpec("validate", "lmpipe.data.validate", "lmpipe.data.config:ValidateConfig",
              "Great Expectations suites on raw and clean data.",
              outs=("reports/validation", "metrics/validate.json"), resources=("src/lmpipe/data/suites",)),
    StageSpec("split", "lmpipe.data.split", "lmpipe.data.config:SplitConfig",
              "Deterministic train/val/test split of data/clean/ (only after validate passed).",
              outs=("data/split",)),
    StageSpec("tokenizer", "lmpipe.tokenizer.train", "lmpipe.tokenizer.config:TokenizerConfig",
              "Train a sentencepiece tokenizer on the train split.",
              outs=("artifacts/tokenizer", "metrics/tokenizer.json")),
    StageSpec("tokenize", "lmpipe.tokenizer.shards", "lmpipe.tokenizer.config:TokenizeConfig",
              "Tokenize the splits into memory-mapped token shards.", outs=("data/tokens",)),
    StageSpec("pretrain", "lmpipe.train.pretrain.stage", "lmpipe.train.pretrain.config:PretrainConfig",
              "Pretrain the GPT model on the token shards.",
              outs=("models/pretrain", "metrics/pretrain.json", "plots/pretrain_loss.csv")),
    StageSpec("finetune", "lmpipe.train.finetune.stage", "lmpipe.train.finetune.config:FinetuneConfig",
              "Instruction tuning and classification heads (LoRA optional).",
              outs=("models/finetune/{task}", "metrics/finetune_{task}.json", "plots/finetune/{task}"),
              inputs=True, tasks="tasks"),
    StageSpec("distill", "lmpipe.train.distill.stage", "lmpipe.train.distill.config:DistillConfig",
              "Distil a teacher model into a smaller student.",
              outs=("models/distill", "models/distill_baseline"), inputs=True),
    StageSpec("evaluate", "lmpipe.evaluate.run", "lmpipe.evaluate.config:EvaluateConfig",
              "Perplexity, bits per byte, task metrics, speed; the HTML report.",
              outs=("reports/report.html", "reports/evaluation.json", "metrics/evaluate.json"), inputs=True),
    StageSpec("register", "lmpipe.registry.register", "lmpipe.registry.config:RegisterConfig",
              "Register trained models in MLflow and promote by the gate.",
              outs=("metrics/register.json",), network=True),
)
STAGES: dict[str, StageSpec] = {spec.name: spec for spec in STAGE_LIST}

# Sections that belong to no stage: MLflow tracking; the Prefect flow's settings (timeouts, one run
# per checkout), which no DVC stage reads; and ``engine``, which is operational: where the data
# stages run, never what they write (see lmpipe.engine).
OTHER_SECTIONS: dict[str, str] = {"tracking": "lmpipe.config:TrackingConfig", "flow": "lmpipe.flow_config:FlowConfig",
                                  "engine": "lmpipe.engine:EngineConfig"}


def section_classes() -> dict[str, str]:
    """Section name -> ``"module:Class"`` of its model, in params.yaml order."""
    sections = dict(OTHER_SECTIONS)
    sections.update({spec.name: spec.config for spec in STAGE_LIST if spec.config})
    return sections


def network_stages() -> set[str]:
    return {spec.name for spec in STAGE_LIST if spec.network}
