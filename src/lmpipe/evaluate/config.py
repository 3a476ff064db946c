"""Config section ``evaluate``: which models to score on what, the teacher/student comparison,
speed measurement settings, masked-LM scoring and the report.

```yaml
evaluate:
  models: {teacher: models/pretrain, student: models/distill, baseline: models/distill_baseline}
  compare: {teacher: teacher, students: [student, baseline]}
  eval_files: [{name: wikitext2, path: ../shared/data/wikitext2/valid.txt}]
  classification: {cls: {models: {finetuned: models/finetune/cls}}}
  token_classification: {ner: {models: {finetuned: models/finetune/ner}}}
  instruction: {sft: {model: models/finetune/sft}}
  baselines: {model: models/pretrain, shots: [0, 4]}
  lm_eval: {enabled: true, model: models/pretrain}
```
"""

from __future__ import annotations

from typing import ClassVar, Literal, Self

from pydantic import Field, model_validator

from lmpipe.config import Section
from lmpipe.train.finetune.config import DataSource, SplitData, split_source

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class EvalFile(Section):
    """A text file scored for loss, perplexity and bits per byte (e.g. WikiText-2's valid.txt)."""

    name: str = Field(..., pattern=NAME_PATTERN, description="Name used in metrics and the report.")
    path: str = Field(..., description="The file, relative to the project root.", json_schema_extra={"lmpipe_input": "paths"})
    format: Literal["text", "jsonl"] = Field(
        "text", description="text: every non-empty line is a document; jsonl: one document per line in text_field.")
    text_field: str = Field("text", description="jsonl: the field holding the text.")


class Comparison(Section):
    """The teacher/student table: quality retained, size and speed-up of each student."""

    teacher: str = Field("teacher", description="Name (in models) of the reference model.")
    students: list[str] = Field(
        default_factory=lambda: ["student", "baseline"],
        description="Names (in models) compared with the teacher; the baseline is the student trained without "
        "distillation at the same size and budget.",
    )
    quality_split: str = Field(
        "val", description="Split (or eval file name) whose bits per byte define quality: retained = teacher bpb / "
        "student bpb (lower bpb is better).",
    )


def _check_baseline_rows(task: ClassificationEval | InstructionEval | TokenClassificationEval) -> None:
    """Rows scored from outside data/split need the baselines' training rows named as well: the
    default (the split's train documents of the embedded kind) would be another task's, or none."""
    data, train = task.data, task.train_data
    if "train_data" not in task.model_fields_set and not isinstance(data, SplitData):
        assert isinstance(train, SplitData)  # the default
        raise ValueError(f"train_data: set the baselines' labelled training rows (data is read from {data.type}, "
                         f"so the default, data/split/{train.split} documents of kind '{train.kind}', is not this "
                         "task's); the fine-tuned model's train_data is the usual choice")


class _PromptedTask(Section):
    """A task whose ``prompt`` template has one ``{placeholder}`` for the row's text."""

    placeholder: ClassVar[str]
    prompt: str

    @model_validator(mode="after")
    def _check_prompt(self) -> Self:
        if self.prompt.count("{" + self.placeholder + "}") != 1:
            raise ValueError(f"prompt must contain {{{self.placeholder}}} exactly once")
        _check_baseline_rows(self)  # type: ignore[arg-type]  # each concrete task has data and train_data
        return self


class ClassificationEval(_PromptedTask):
    """Accuracy and F1 of classifiers (written by finetune or distill) on labelled rows."""

    placeholder = "text"

    models: dict[str, str] = Field(..., min_length=1, description="Name -> classifier model directory.")
    data: DataSource = Field(default_factory=lambda: split_source("test", "review"),
                             description="Labelled rows to score (text, label).")
    batch_size: int = Field(64, gt=0, description="Examples per batch.")
    train_data: DataSource = Field(
        default_factory=lambda: split_source("train", "review"),
        description="Labelled training rows of the baselines: the majority class, the bag-of-words model and the "
        "in-context examples of the prompted base model (the fine-tuned model's train split). Required when data "
        "is not from data/split.")
    prompt: str = Field(
        "{text}\nSentiment:", description="Prompt of the prompted baselines and of lm-eval's multiple-choice task; "
        "{text} is the row's text, the label word follows it after a space.")
    label_words: dict[str, str] = Field(
        default_factory=dict, description="Label -> the word the base model is scored on (its verbalisation); a "
        "label not listed is its own word.")


class TokenClassificationEval(Section):
    """Entity-level precision, recall and F1 (seqeval) of token classifiers (written by finetune,
    type token_classification) on tagged sentences, next to the most-frequent-tag baseline."""

    models: dict[str, str] = Field(..., min_length=1, description="Name -> token classifier model directory.")
    data: DataSource = Field(default_factory=lambda: split_source("test", "entity"),
                             description="Tagged sentences to score (tokens, tags; or CoNLL files).")
    train_data: DataSource = Field(
        default_factory=lambda: split_source("train", "entity"),
        description="Tagged training sentences of the baseline that tags each word with its most frequent tag. "
        "Required when data is not from data/split.")
    strict: bool = Field(True, description="Refuse an I-X after O or another type in the data (IOB2).")
    batch_size: int = Field(64, gt=0, description="Sentences per batch.")

    @model_validator(mode="after")
    def _check_train_data(self) -> Self:
        _check_baseline_rows(self)
        return self


class InstructionEval(_PromptedTask):
    """Answers of an instruction-tuned model, scored with BLEU (sacrebleu) and ROUGE-L."""

    placeholder = "user"

    model: str = Field(..., description="Instruction-tuned model directory (written by finetune, type sft).")
    data: DataSource = Field(default_factory=lambda: split_source("test", "instruction"),
                             description="Conversations whose last assistant turn is the reference answer.")
    max_examples: int = Field(50, gt=0, description="Prompts answered (the first N of data).")
    max_new_tokens: int = Field(96, gt=0, description="Longest generated answer in tokens.")
    system_prompt: str | None = Field(None, description="System message for conversations without one.")
    train_data: DataSource = Field(
        default_factory=lambda: split_source("train", "instruction"),
        description="Conversations the in-context examples of the prompted baselines are drawn from. Required when "
        "data is not from data/split.")
    prompt: str = Field(
        "Instruction: {user}\nAnswer:", description="Prompt of the prompted base model; {user} is the last user "
        "turn, the reference answer follows it after a space (the embedded default's documents read this way).")


class BaselineSettings(Section):
    """What a fine-tuned model is measured against: per classification task the majority class, a
    bag-of-words model (TF-IDF over word 1-2-grams + logistic regression) and the base model
    prompted with k examples from train; per instruction task the prompted base model's loss on
    the reference answers."""

    enabled: bool = Field(True, description="Compute the baselines of every classification and instruction task.")
    model: str = Field("models/pretrain", description="The base model that is prompted (the fine-tuned models' init).")
    shots: list[int] = Field(default_factory=lambda: [0, 4], min_length=1,
                             description="In-context example counts (0: zero-shot).")
    seed: int = Field(1234, description="Seed of the in-context example draw (one draw per scored example).")
    batch_size: int = Field(32, gt=0, description="Prompts per forward pass.")
    max_examples: int | None = Field(
        500, gt=0, description="Prompted baselines score at most the first N rows of a task (null: all).")

    @model_validator(mode="after")
    def _check(self) -> BaselineSettings:
        if any(k < 0 for k in self.shots) or len(set(self.shots)) != len(self.shots):
            raise ValueError("shots: distinct counts, each >= 0")
        return self


class LmEvalSettings(Section):
    """lm-evaluation-harness on the Hugging Face export of a model, with tasks written here from the
    project's own data: each classification task as multiple choice, and the perplexity of a split."""

    enabled: bool = Field(False, description="Run it inside evaluate too (`lmpipe lm-eval` always runs it).")
    model: str = Field("models/pretrain", description="Model directory exported and evaluated.")
    classification: list[str] | None = Field(
        None, description="Names (in evaluate.classification) run as multiple-choice tasks; null: all of them.")
    perplexity_split: Literal["train", "val", "test"] | None = Field(
        "test", description="Split whose documents are scored as a rolling-loglikelihood perplexity task "
        "(null: none).")
    limit: int | None = Field(200, gt=0, description="At most this many documents per task (null: all).")
    batch_size: int = Field(16, gt=0, description="lm-eval's batch size.")


class MaskedLMSettings(Section):
    """How a masked-LM model (pretrain.objective: mlm) is scored instead of causally: masked-token loss
    and accuracy at the mask rate it was pretrained with, and pseudo-perplexity on a sample of windows."""

    seed: int = Field(1234, description="Seed of the masks (one draw per window, the same for every model).")
    pseudo_perplexity_windows: int = Field(
        16, ge=0, description="Windows per split or file whose every token is masked in turn for pseudo-perplexity "
        "(one forward pass per token; 0: none).")


class SpeedSettings(Section):
    """Generation speed: greedy decoding with the KV cache, timed after warm-up runs."""

    enabled: bool = Field(True, description="Measure generation speed.")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], min_length=1,
                                   description="Batch sizes to time (1: latency; larger: throughput).")
    prompt_tokens: int = Field(16, gt=0, description="Prompt length in tokens.")
    new_tokens: int = Field(64, gt=0, description="Tokens generated per sequence.")
    repeats: int = Field(5, gt=0, description="Timed runs per model and batch size (the median is reported).")
    warmup: int = Field(2, ge=0, description="Untimed runs first (allocations, kernel selection).")
    threads: int | None = Field(None, gt=0, description="CPU threads for torch while timing; null: torch's default.")


class EvaluateConfig(Section):
    """Score models (LM loss, perplexity, bits per byte, tasks, speed), compare teacher and students,
    and write metrics, plots and the HTML report."""

    models: dict[str, str] = Field(
        default_factory=lambda: {"teacher": "models/pretrain", "student": "models/distill",
                                 "baseline": "models/distill_baseline"},
        description="Name -> model directory (relative to the project root) for LM metrics, speed and samples.",
    )
    missing: Literal["error", "skip"] = Field(
        "error", description="A configured model directory (in models or a task) that does not exist: error, or "
        "skip it with a warning.")
    splits: list[Literal["train", "val", "test"]] = Field(
        default_factory=lambda: ["val", "test"], description="Token splits (data/tokens/) scored per model.")
    eval_files: list[EvalFile] = Field(default_factory=list, description="Extra text files scored per model.")
    max_tokens: int = Field(
        1_000_000, gt=0, description="At most this many tokens per split or file and model (the first ones).")
    stride: int | None = Field(
        None, gt=0, description="Sliding-window step: each window scores only its last `stride` tokens, the rest is "
        "context; null: non-overlapping windows (block_size), as the training val loss.")
    batch_size: int = Field(16, gt=0, description="Windows per forward pass.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where models run: auto picks cuda if present.")
    precision: Literal["auto", "32-true", "bf16-mixed"] = Field(
        "auto", description="auto: bf16 autocast on a GPU that supports it, else fp32.")
    compare: Comparison = Field(default_factory=Comparison, description="Teacher vs students table.")
    classification: dict[str, ClassificationEval] = Field(
        default_factory=lambda: {"cls": ClassificationEval(models={"finetuned": "models/finetune/cls"})},
        description="Task name -> classifiers and data ({} for none); default: the finetune stage's 'cls' task on "
        "the test reviews.")
    token_classification: dict[str, TokenClassificationEval] = Field(
        default_factory=dict,
        description="Task name -> token classifiers and tagged data ({} for none); the embedded default scores "
        "the finetune stage's 'ner' task on the test entity documents.")
    instruction: dict[str, InstructionEval] = Field(
        default_factory=lambda: {"sft": InstructionEval(model="models/finetune/sft")},
        description="Task name -> instruction model and data ({} for none); default: the finetune stage's 'sft' "
        "task on the test instructions.")
    prompts: list[str] = Field(
        default_factory=lambda: ["Once upon a time", "The movie was"],
        description="Fixed prompts continued by every model for the report's sample generations.")
    sample_tokens: int = Field(48, ge=0, description="Tokens per sample generation (0: none).")
    sample_temperature: float = Field(0.0, ge=0, description="Sampling temperature of samples (0: greedy).")
    seed: int = Field(1234, description="Seed of sampled generations.")
    speed: SpeedSettings = Field(default_factory=SpeedSettings, description="Generation speed measurement.")
    masked_lm: MaskedLMSettings = Field(default_factory=MaskedLMSettings,
                                        description="Scores of masked-LM models (no causal metrics for them).")
    report_title: str = Field("lmpipe report", description="Title of reports/report.html.")
    baselines: BaselineSettings = Field(default_factory=BaselineSettings,
                                        description="Baselines next to every fine-tuned task score.")
    lm_eval: LmEvalSettings = Field(default_factory=LmEvalSettings, description="lm-evaluation-harness.")

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        import re

        for name in [*self.models, *self.classification, *self.token_classification, *self.instruction]:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"name {name!r} must be letters, digits, '_' or '-'")
        names = [f.name for f in self.eval_files]
        if len(set(names)) != len(names):
            raise ValueError("eval_files: each name must be used once")
        if clash := set(names) & {"train", "val", "test"}:
            raise ValueError(f"eval_files: name {sorted(clash)[0]!r} is a split name; pick another")
        unknown = sorted(set(self.lm_eval.classification or []) - set(self.classification))
        if unknown:
            raise ValueError(f"lm_eval.classification: {unknown[0]!r} is not a task of evaluate.classification")
        return self
