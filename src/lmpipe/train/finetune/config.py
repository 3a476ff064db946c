"""Config section ``finetune``: named tasks (instruction tuning, classification or token
classification), each with its data sources, full or LoRA fine-tuning, optimisation, early stopping
and hardware settings.

```yaml
finetune:
  tasks:
    sft: {type: sft, method: lora, max_steps: 300}
    cls: {type: classification, pooling: last, train_data: {type: files, paths: [sst2/train.tsv],
          columns: {text: sentence}}}
    ner: {type: token_classification, train_data: {type: files, paths: [conll2003/train.txt], format: conll}}
```
Each task is one DVC ``foreach`` item (``finetune@sft``) and one ``lmpipe finetune --task NAME``.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from lmpipe.config import Section
from lmpipe.train.settings import (
    OPERATIONAL,
    AccumulationSettings,
    DevEvalSettings,
    HardwareSettings,
    LoggingSettings,
    OptimSettings,
    TrainSettings,
    stage_default,
)

SplitName = Literal["train", "val", "test"]
TASK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
# The fields each task type reads from a row; `columns` may map them to other column names.
SFT_FIELDS = ("instruction", "input", "output", "messages", "system")
CLASSIFICATION_FIELDS = ("text", "label")
TOKEN_CLASSIFICATION_FIELDS = ("tokens", "tags")


class _DataBase(Section):
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Field -> column of this source, for fields named differently here (classification: text, "
        "label; token_classification: tokens, tags; sft: instruction, input, output, messages, system), e.g. "
        "{text: sentence}.",
    )
    max_examples: int | None = Field(None, gt=0, description="Use at most the first N examples.")


class SplitData(_DataBase):
    """Documents of data/split/<split>: a row is the document's `text` plus the keys of its `meta`."""

    type: Literal["split"]
    split: SplitName = Field("train", description="Which split directory: train, val or test.")
    kind: str | None = Field(
        None, description="Keep documents whose meta.kind is this (the embedded default has 'instruction' and "
        "'review' documents); null: every document.",
    )


class FilesData(_DataBase):
    """Local files: jsonl, json (a list of objects), csv, tsv or parquet; paths may be globs."""

    type: Literal["files"]
    paths: list[str] = Field(..., min_length=1, description="Files or glob patterns, relative to the project root.",
                             json_schema_extra={"lmpipe_input": "paths"})
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "conll"] = Field(
        "auto", description="File format; 'auto' picks by extension. conll (token classification): a token and its "
        "tag per line (tag in the last column), a blank line between sentences, -DOCSTART- lines skipped."
    )


class HFData(_DataBase):
    """A Hugging Face dataset: a hub name, a local dataset directory, or a builder with data_files."""

    type: Literal["hf"]
    path: str = Field(..., description="Hub name, local dataset dir, or a builder ('json', 'csv', 'parquet').",
                      json_schema_extra={"lmpipe_input": "hf"})
    config_name: str | None = Field(None, description="Dataset configuration.")
    split: str = Field("train", description="Split to read.")
    revision: str | None = Field(None, description="Git revision of a hub dataset (pin it for reproducibility).")
    data_files: str | list[str] | None = Field(None, description="Files for builder datasets ('json', 'csv').",
                                               json_schema_extra={"lmpipe_input": "paths"})


DataSource = Annotated[SplitData | FilesData | HFData, Field(discriminator="type")]


def split_source(split: SplitName, kind: str) -> SplitData:
    return SplitData(type="split", split=split, kind=kind)


class LoraSettings(Section):
    """Low-rank adapters (Hu et al. 2021): W + (alpha / r) * B A on the listed Linear layers."""

    r: int = Field(8, gt=0, description="Rank of the update matrices.")
    alpha: int = Field(16, gt=0, description="Scale numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["c_attn", "c_proj", "c_fc"], min_length=1,
        description="Names (suffixes) of the Linear layers that get adapters: c_attn (QKV), c_proj (attention and "
        "MLP output), c_fc (MLP input).",
    )
    save_adapter: bool = Field(True, json_schema_extra=OPERATIONAL, description="Also write the adapter weights alone (adapter/) next to the merged model.")


class _TaskBase(DevEvalSettings, TrainSettings, AccumulationSettings):
    # What the task reads of the base model, which decides the bases it can start from: hidden
    # states under a head (any base, a masked-LM encoder too) or next-token predictions (a causal
    # LM only; a masked-LM base is refused before any data is read).
    needs_causal_lm: ClassVar[bool] = False
    uses: ClassVar[str] = ""  # what needs the causal LM, for the error (see lmpipe.model.io.refuse_masked_lm)
    # Fine-tuning starts from trained weights, for a few hundred steps on small batches; where
    # that calls for another default than pretraining's, it is set here.
    max_steps: int = stage_default(OptimSettings, "max_steps", 300,
                                   description="Optimizer steps to train for (early stopping may end sooner).")
    # A tenth of pretraining's or less, as BERT/RoBERTa fine-tuning: a large step erases what was learned.
    lr: float = stage_default(OptimSettings, "lr", 5e-4)
    warmup_steps: int = stage_default(OptimSettings, "warmup_steps", 20)  # short runs: a short warmup
    # BERT's fine-tuning value: decay pulls the pretrained matrices towards zero, not towards the base.
    weight_decay: float = stage_default(OptimSettings, "weight_decay", 0.01)
    # AdamW's usual 0.999 (BERT, Hugging Face recipes): the 0.95 of pretraining guards long
    # large-batch runs from scratch against loss spikes, not a few hundred steps from trained weights.
    beta2: float = stage_default(OptimSettings, "beta2", 0.999, description="AdamW beta2.")
    # Fine-tuning batches are small and uneven, so loss spikes are common and no reason to stop.
    spike_factor: float = stage_default(LoggingSettings, "spike_factor", 0.0)
    # A task model is replicated whole; FSDP's sharding is for pretraining sizes.
    strategy: Literal["auto", "ddp"] = stage_default(HardwareSettings, "strategy", "auto",
                                                     annotation=Literal["auto", "ddp"])
    init: str = Field("models/pretrain", description="Model directory to start from, relative to the project root.")
    method: Literal["full", "lora"] = Field("full", description="full: train every weight; lora: train adapters only.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings (method: lora).")
    max_length: int | None = Field(
        None, gt=1, description="Longest example in tokens (longer ones are cut); null: the model's block_size."
    )
    seed: int = Field(1337, description="Seed of head/adapter init, example order and dropout.")

    def _check_columns(self, allowed: tuple[str, ...]) -> None:
        for name in ("train_data", "dev_data", "test_data", "sample_data"):
            source = getattr(self, name, None)
            if source is None:
                continue
            unknown = sorted(set(source.columns) - set(allowed))
            if unknown:
                raise ValueError(f"{name}.columns: unknown field(s) {', '.join(unknown)} (fields: {', '.join(allowed)})")


class SFTTask(_TaskBase):
    """Instruction tuning: chat-formatted prompts, loss on the assistant's answer tokens only."""

    needs_causal_lm = True
    uses = "instruction tuning (type: sft) trains and generates answers"

    type: Literal["sft"]
    method: Literal["full", "lora"] = Field("lora", description="full: train every weight; lora: train adapters only.")
    # LoRA trains a few adapter weights from zero: they take a larger step than full fine-tuning's.
    lr: float = stage_default(OptimSettings, "lr", 1e-3)
    train_data: DataSource = Field(
        default_factory=lambda: split_source("train", "instruction"),
        description="Training examples: rows with instruction/input/output fields, or a messages list.",
    )
    dev_data: DataSource = Field(
        default_factory=lambda: split_source("val", "instruction"),
        description="Dev examples for the answer loss, early stopping and the final metrics.",
    )
    sample_data: DataSource | None = Field(
        None, json_schema_extra=OPERATIONAL,
        description="Held-out prompts answered by the fine-tuned model after training (null: the first "
        "conversations of dev_data). The default task uses the test split's instruction pairs.",
    )
    sample_count: int = Field(1, ge=0, json_schema_extra=OPERATIONAL, description="How many held-out prompts to answer.")
    max_new_tokens: int = Field(96, gt=0, json_schema_extra=OPERATIONAL, description="Longest generated answer in tokens.")
    system_prompt: str | None = Field(
        None, description="System message put before every conversation that has none (null: no system turn)."
    )
    monitor: Literal["loss", "token_accuracy"] = Field(
        "loss", description="Dev metric for early stopping and best-model selection."
    )

    @model_validator(mode="after")
    def _check(self) -> SFTTask:
        self._check_columns(SFT_FIELDS)
        return self


class _HeadTask(_TaskBase):
    """What the tasks with a head on the backbone share: test rows, the label set, head dropout."""

    test_data: DataSource | None = Field(
        None, json_schema_extra=OPERATIONAL,
        description="Test rows scored once with the selected model (null: none). The default task uses the test "
        "split's documents of its kind.",
    )
    labels: list[str] | None = Field(
        None, description="The label set (token classification: the tags, O and B-/I- ones), in this order; null: "
        "the sorted distinct labels of the training data.",
    )
    head_dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before the head.")

    def _check_labels(self) -> None:
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("labels: each label must be listed once")


class ClassificationTask(_HeadTask):
    """Single-label text classification with a linear head on the pooled hidden states of the base
    model: a causal decoder, or a masked-LM encoder (the BERT-style path)."""

    type: Literal["classification"]
    train_data: DataSource = Field(
        default_factory=lambda: split_source("train", "review"), description="Training rows with text and label."
    )
    dev_data: DataSource = Field(
        default_factory=lambda: split_source("val", "review"),
        description="Dev rows: early stopping, best-model selection and the reported metrics.",
    )
    pooling: Literal["last", "mean", "first"] = Field(
        "last", description="last: hidden state of the final token (it has attended to all others); mean: "
        "average over the tokens; first: the first token, BERT's [CLS] position (a masked-LM base only: in a "
        "causal model it has seen nothing but itself).",
    )
    class_weights: Literal["none", "balanced"] | list[float] = Field(
        "none", description="Loss weight per class: none, balanced (n / (k * count), as scikit-learn), or a list "
        "in label order.",
    )
    monitor: Literal["accuracy", "macro_f1", "loss"] = Field(
        "accuracy", description="Dev metric for early stopping and best-model selection."
    )

    @model_validator(mode="after")
    def _check(self) -> ClassificationTask:
        self._check_columns(CLASSIFICATION_FIELDS)
        self._check_labels()
        if self.labels is not None and len(self.labels) < 2:
            raise ValueError("labels: a classifier needs at least 2 labels")
        if isinstance(self.class_weights, list):
            if any(w <= 0 for w in self.class_weights):
                raise ValueError("class_weights: every weight must be positive")
            if self.labels is not None and len(self.class_weights) != len(self.labels):
                raise ValueError(f"class_weights: {len(self.class_weights)} weights for {len(self.labels)} labels")
        return self


class TokenClassificationTask(_HeadTask):
    """Sequence labelling (named entities): a linear head on every token's hidden state, word tags
    in the IOB2 scheme, scored at the entity level (seqeval)."""

    type: Literal["token_classification"]
    train_data: DataSource = Field(
        default_factory=lambda: split_source("train", "entity"),
        description="Training sentences: rows with a tokens list and a tags list of the same length (jsonl, "
        "json, parquet, hf, the meta of split documents), or CoNLL files (format: conll).",
    )
    dev_data: DataSource = Field(
        default_factory=lambda: split_source("val", "entity"),
        description="Dev sentences: early stopping, best-model selection and the reported metrics.",
    )
    scheme: Literal["IOB2"] = Field("IOB2", description="Tagging scheme: IOB2 (B- opens every entity, I- continues it, O outside).")
    strict: bool = Field(
        True, description="Refuse a sentence where I-X follows O or a tag of another type (IOB2 requires B-X "
        "there); false: read such an I-X as opening an entity, as conlleval does.",
    )
    monitor: Literal["f1", "token_accuracy", "loss"] = Field(
        "f1", description="Dev metric for early stopping and best-model selection (f1: entity-level micro F1).",
    )

    @model_validator(mode="after")
    def _check(self) -> TokenClassificationTask:
        self._check_columns(TOKEN_CLASSIFICATION_FIELDS)
        self._check_labels()
        bad = [t for t in self.labels or [] if t != "O" and not t.startswith(("B-", "I-"))]
        if bad:
            raise ValueError(f"labels: {bad[0]!r} is not an IOB2 tag (O, B-TYPE or I-TYPE)")
        return self


Task = Annotated[SFTTask | ClassificationTask | TokenClassificationTask, Field(discriminator="type")]


def _default_tasks() -> dict[str, SFTTask | ClassificationTask | TokenClassificationTask]:
    """The embedded default's tasks: its instruction pairs, reviews and entity sentences from data/split/."""
    return {"sft": SFTTask(type="sft", sample_data=split_source("test", "instruction")),
            "cls": ClassificationTask(type="classification", test_data=split_source("test", "review")),
            "ner": TokenClassificationTask(type="token_classification", test_data=split_source("test", "entity"))}


class FinetuneConfig(Section):
    """Fine-tune models/pretrain on named tasks (instruction tuning, text or token classification; full or LoRA)."""

    tasks: dict[str, Task] = Field(
        default_factory=_default_tasks,
        description="Task name -> task (type: sft | classification | token_classification). Outputs go to "
        "models/finetune/<name>/ and metrics/finetune_<name>.json.",
    )

    @model_validator(mode="after")
    def _names(self) -> FinetuneConfig:
        import re

        for name in self.tasks:
            if not re.match(TASK_NAME_PATTERN, name):
                raise ValueError(f"tasks: name {name!r} must be letters, digits, '_' or '-' (it names directories)")
        return self

