"""Config sections of the data stages: ``collect``, ``clean``, ``validate``, ``split``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from lmpipe.config import Section
from lmpipe.data.checks import declare_fields

# ---------------------------------------------------------------------------------------- collect


class _SourceBase(Section):
    name: str = Field(..., min_length=1, description="Name recorded in the `source` column.")
    weight: float = Field(
        1.0,
        gt=0,
        description="Relative share of the mixture. The mixture is as large as the sources allow "
        "at these proportions (and collect.max_docs).",
    )
    max_docs: int | None = Field(None, gt=0, description="Read at most this many documents.")
    pack_chars: int | None = Field(
        None,
        gt=0,
        description="Join consecutive records, one per line, into documents of at least this many characters "
        "(for data with a sentence per row, which the length and quality rules would drop one by one); "
        "null: one document per record. max_docs counts the joined documents.",
    )


class HFSource(_SourceBase):
    """A Hugging Face dataset by hub name, or a local dataset directory / data files."""

    type: Literal["hf"]
    path: str = Field(..., description="Hub name ('wikitext'), a local dataset dir or a builder ('json', 'parquet').",
                      json_schema_extra={"lmpipe_input": "hf"})
    config_name: str | None = Field(None, description="Dataset configuration (e.g. 'wikitext-2-raw-v1').")
    split: str = Field("train", description="Split to read.")
    revision: str | None = Field(None, description="Git revision of a hub dataset (pin it for reproducibility).")
    data_files: str | list[str] | None = Field(None, description="Files for builder datasets ('json', 'parquet').",
                                               json_schema_extra={"lmpipe_input": "paths"})
    text_field: str = Field("text", description="Column holding the text.")
    streaming: bool = Field(False, description="Stream instead of downloading the whole dataset first.")


class FilesSource(_SourceBase):
    """Local files: txt, jsonl, parquet, csv/tsv; paths may be globs."""

    type: Literal["files"]
    paths: list[str] = Field(..., min_length=1, description="Files or glob patterns, relative to the project root.",
                             json_schema_extra={"lmpipe_input": "paths"})
    format: Literal["auto", "txt", "jsonl", "parquet", "csv", "tsv"] = Field(
        "auto", description="File format; 'auto' picks by extension."
    )
    text_field: str = Field("text", description="Column/field holding the text (jsonl, parquet, csv).")
    txt_split: Literal["file", "paragraph", "line"] = Field(
        "paragraph", description="For txt: one document per file, per blank-line paragraph, or per line."
    )


class UrlSource(_SourceBase):
    """A file downloaded over HTTP(S), verified against its sha256.

    What a download may do is bounded (``lmpipe.data.download.UrlPolicy``): http(s) only, at most
    ``max_bytes``, done within ``deadline_s``, at most ``max_redirects`` redirects, and the URL and
    every redirect must resolve to public addresses unless ``allow_networks`` names the range.
    """

    type: Literal["url"]
    url: str = Field(..., description="http(s) URL of a txt/jsonl/parquet/csv file.")
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$", description="Expected sha256 of the downloaded file.")
    format: Literal["auto", "txt", "jsonl", "parquet", "csv", "tsv"] = Field("auto", description="File format.")
    text_field: str = Field("text", description="Column/field holding the text.")
    txt_split: Literal["file", "paragraph", "line"] = Field("paragraph", description="How txt splits into documents.")
    retries: int = Field(4, ge=0, description="Retries with exponential backoff on network errors.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout in seconds (connect, and each read).")
    deadline_s: float = Field(
        3600.0, gt=0, description="Overall limit in seconds for the download: every attempt, redirect and retry."
    )
    max_bytes: int = Field(10 * 1024**3, gt=0, description="Refuse a file larger than this many bytes.")
    max_redirects: int = Field(5, ge=0, description="Follow at most this many HTTP redirects.")
    allow_networks: list[str] = Field(
        default_factory=list,
        description="CIDR ranges the URL or a redirect may reach although they are loopback, link-local, "
        "private or reserved (an internal mirror, e.g. ['10.20.0.0/16']). Empty: public addresses only, so "
        "a source or a redirect cannot reach services inside the network.",
    )

    @field_validator("url")
    @classmethod
    def _http_only(cls, url: str) -> str:
        import urllib.parse

        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"{url!r}: only http:// and https:// URLs with a host are allowed")
        return url

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, networks: list[str]) -> list[str]:
        import ipaddress

        for network in networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as err:
                raise ValueError(f"{network!r} is not a CIDR range ({err})") from None
        return networks


class SyntheticSource(_SourceBase):
    """The embedded default: generated documents with real structure and deliberate noise."""

    type: Literal["synthetic"]
    num_docs: int = Field(4000, gt=0, description="Clean documents to generate (noise is added on top).")
    noise_fraction: float = Field(
        0.15, ge=0, le=1, description="Extra noisy documents (duplicates, boilerplate, PII, other languages...) as a fraction of num_docs."
    )
    kinds: dict[str, float] = Field(
        default_factory=lambda: {"story": 0.5, "review": 0.3, "instruction": 0.2},
        description="Mix of document kinds: story, review (labelled sentiment), instruction.",
    )
    zh_fraction: float = Field(
        0.0, ge=0, le=1, description="Extra Chinese documents of the same kinds and mix, as a fraction of num_docs "
        "(the English documents stay the same for a seed).",
    )
    entity_fraction: float = Field(
        0.0, ge=0, le=1, description="Extra entity documents (people, places, organisations; tokens and IOB2 tags "
        "in meta, for token classification) as a fraction of num_docs; the other documents stay the same.",
    )


    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, kinds: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(kinds) - {"story", "review", "instruction"})
        if unknown:
            raise ValueError(f"unknown kind(s) {', '.join(unknown)}; kinds are story, review, instruction")
        if any(w < 0 for w in kinds.values()) or sum(kinds.values()) <= 0:
            raise ValueError("kind weights must be >= 0 and sum to more than 0")
        return kinds


Source = Annotated[HFSource | FilesSource | UrlSource | SyntheticSource, Field(discriminator="type")]


class CollectConfig(Section):
    """Gather documents from sources, mix them by weight, write data/raw/ parquet shards."""

    seed: int = Field(1234, description="Seed for generation and mixture sampling.")
    max_docs: int | None = Field(None, gt=0, description="Cap on the whole mixture.")
    shard_docs: int = Field(20_000, gt=0, description="Documents per output parquet shard.")
    sources: list[Source] = Field(
        default_factory=lambda: [SyntheticSource(type="synthetic", name="synthetic")],
        min_length=1,
        description="Where text comes from (type: hf | files | url | synthetic).",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> CollectConfig:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, repeated: {', '.join(dupes)}")
        return self


# ------------------------------------------------------------------------------------------ clean


class NormalizeRule(Section):
    enabled: bool = Field(True, description="Unicode normalisation and control-character removal.")
    form: Literal["NFC", "NFKC"] = Field("NFC", description="Unicode normal form.")


class EncodingRule(Section):
    enabled: bool = Field(True, description="Drop documents with broken encodings (U+FFFD, mojibake).")
    max_bad_fraction: float = Field(0.001, ge=0, le=1, description="Max fraction of characters that look broken.")


class LengthRule(Section):
    enabled: bool = True
    min_chars: int = Field(50, ge=0, description="Drop documents shorter than this.")
    max_chars: int = Field(200_000, gt=0, description="Drop documents longer than this.")


class QualityRule(Section):
    """Gopher quality rules (Rae et al. 2021, appendix A.1.1); defaults are the paper's thresholds.
    The fields are the ``quality`` rows of :data:`lmpipe.data.checks.CHECKS`."""

    enabled: bool = True
    declare_fields(locals(), "quality")


class RepetitionRule(Section):
    """Gopher repetition rules (Rae et al. 2021, table A1): the ``repetition`` rows of
    :data:`lmpipe.data.checks.CHECKS` and the word n-gram families."""

    enabled: bool = True
    declare_fields(locals(), "repetition")
    top_ngram_char_fraction: dict[int, float] = Field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16},
        description="n -> max fraction of characters covered by the most frequent word n-gram.",
    )
    dup_ngram_char_fraction: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> max fraction of characters inside word n-grams that occur more than once.",
    )


class LineRule(Section):
    """C4 line filters (Raffel et al. 2020; datatrove's C4QualityFilter): remove boilerplate lines,
    keep the document when enough remains. The fields are the ``lines`` rows of
    :data:`lmpipe.data.checks.CHECKS`.

    Off by default: the filters were written for English web crawl, where menus, cookie notices
    and headings without a full stop are noise. In curated text they cut good documents: on the
    embedded default (1,380 documents) they remove 1,770 lines, nearly all of them the blank lines
    between paragraphs (C4 joins the lines it keeps with single newlines, so paragraphs are lost),
    and drop 34 short documents for fewer than five sentences; on Wikipedia articles they remove
    every section heading. Each filter's own default is C4's, so ``enabled: true`` is C4. The
    rules are English: documents in other languages are left alone (``languages``), since Chinese
    ends sentences with '。' and has no spaces between words, so every line would fail the
    terminal-punctuation and words-per-line filters; Chinese is judged by its clean.languages profile.
    """

    enabled: bool = Field(False, description="Apply the C4 line filters (rewrites the documents they keep).")
    languages: list[str] = Field(default_factory=lambda: ["en"],
                                 description="Languages (as clean.language detects them) the line filters apply to.")
    declare_fields(locals(), "lines")


class LanguageRule(Section):
    enabled: bool = True
    keep: list[str] = Field(default_factory=lambda: ["en"], min_length=1, description="ISO 639-1 codes to keep (e.g. en, zh).")
    min_confidence: float = Field(0.5, ge=0, le=1, description="Drop when the detector's confidence is below this.")


class PiiRule(Section):
    enabled: bool = True
    email: bool = Field(True, description="Replace e-mail addresses with <EMAIL>.")
    phone: bool = Field(True, description="Replace phone numbers (mainland China mobiles and landlines too) with <PHONE>.")
    ip: bool = Field(True, description="Replace IPv4 addresses with <IP_ADDRESS>.")
    id_number: bool = Field(True, description="Replace mainland China resident ID numbers (18 characters, valid "
                            "GB 11643 check digit) with <ID_NUMBER>.")


# FineWeb-2's Chinese stop words (huggingface/fineweb-2, configs/cmn_Hani.yml): the 22 most frequent
# words of its Chinese data, Simplified and Traditional forms both.
CHINESE_STOP_WORDS = ("的", "年", "在", "月", "是", "和", "日", "了", "於", "·", "為", "有", "被", "人", "中", "为",
                      "他", "與", "後", "也", "而", "由")


class LanguageProfile(Section):
    """How documents of one language (as `clean.language` detects it) are judged.

    ``quality`` and ``repetition``, when given, replace clean.quality / clean.repetition for this
    language whole (keys left out take their Gopher defaults, not the general section's values); the
    general ``enabled`` switches still turn a rule group off for every language.
    """

    segmenter: Literal["characters", "jieba"] = Field(
        "characters",
        description="How words are counted. characters: whitespace-separated words, and each CJK ideograph or "
        "kana a word of its own (the fallback for CJK text without a segmenter, e.g. Japanese; Korean separates "
        "words with spaces). jieba: Chinese word segmentation with jieba (about 1 MB/s per core).",
    )
    stop_words: list[str] = Field(
        default_factory=list, description="Stop words counted for quality.min_stop_words (empty: no stop-word check).")
    quality: QualityRule | None = Field(None, description="Quality rules for this language (null: clean.quality).")
    repetition: RepetitionRule | None = Field(None, description="Repetition rules for this language (null: clean.repetition).")


def chinese_profile() -> LanguageProfile:
    """Chinese as FineWeb-2 filters it (Penedo et al. 2025; huggingface/fineweb-2, configs/cmn_Hani.yml):
    words by jieba (datatrove's Chinese word tokenizer), mean word length 1-5, at least 73.5% of
    words with a letter (its max_non_alpha_words_ratio 0.735, a minimum despite the name), 22 stop
    words, duplicate lines <= 28.7% (dup_line_frac), and its top/duplicate n-gram limits. Every other
    threshold is Gopher's, as in FineWeb-2."""
    return LanguageProfile(
        segmenter="jieba",
        stop_words=list(CHINESE_STOP_WORDS),
        quality=QualityRule.model_validate(
            {"min_mean_word_length": 1.0, "max_mean_word_length": 5.0, "min_alpha_word_fraction": 0.735}),
        repetition=RepetitionRule.model_validate({
            "max_dup_line_fraction": 0.287,
            "top_ngram_char_fraction": {2: 0.256, 3: 0.201, 4: 0.171},
            "dup_ngram_char_fraction": {5: 0.198, 6: 0.182, 7: 0.167, 8: 0.154, 9: 0.14, 10: 0.127},
        }),
    )


class MarkdownRule(Section):
    enabled: bool = Field(
        False,
        description="Judge Markdown as structure: the word and repetition rules read the prose only (code fences, "
        "math blocks and inline formulas, table pipes, heading, list and quote markers are set aside), so "
        "headings are not symbols and a list of sentences is not a bullet-line menu. For corpora whose normal "
        "shape is Markdown (technical articles, documentation).",
    )


class ExactDedupRule(Section):
    enabled: bool = Field(True, description="Drop documents whose normalised text (case, whitespace, punctuation) was seen before.")


class NearDedupRule(Section):
    enabled: bool = Field(True, description="MinHash LSH near-duplicate removal.")
    threshold: float = Field(0.8, gt=0, le=1, description="Estimated Jaccard similarity at or above which a document is a duplicate.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    shingle_size: int = Field(5, ge=1, description="Word n-gram size of the shingles.")
    seed: int = Field(1, description="Seed of the hash permutations.")
    memory_mb: int = Field(
        4096, gt=0, description="Memory budget of the local engine's near-dedup index. A corpus whose index could "
        "outgrow it (estimated from the raw document count) spills its LSH bands to disk partitions next to "
        "data/clean, resolved one at a time: the same documents kept, a second pass over the survivors.")


class DecontaminateRule(Section):
    enabled: bool = True
    ngram: int = Field(13, ge=3, description="Drop documents sharing a word n-gram of this size with an eval set (GPT-3 used 13).")
    eval_files: list[str] = Field(default_factory=list, description="Eval sets (txt/jsonl/parquet/csv files or globs).",
                                  json_schema_extra={"lmpipe_input": "paths"})
    eval_text_field: str = Field("text", description="Text field of structured eval files.")


class CleanConfig(Section):
    """Normalise, filter, redact and deduplicate data/raw/ into data/clean/ with clean_report.json."""

    normalize: NormalizeRule = Field(default_factory=NormalizeRule)
    encoding: EncodingRule = Field(default_factory=EncodingRule)
    length: LengthRule = Field(default_factory=LengthRule)
    language: LanguageRule = Field(default_factory=LanguageRule)
    quality: QualityRule = Field(default_factory=QualityRule)
    repetition: RepetitionRule = Field(default_factory=RepetitionRule)
    lines: LineRule = Field(default_factory=LineRule)
    pii: PiiRule = Field(default_factory=PiiRule)
    exact_dedup: ExactDedupRule = Field(default_factory=ExactDedupRule)
    near_dedup: NearDedupRule = Field(default_factory=NearDedupRule)
    decontaminate: DecontaminateRule = Field(default_factory=DecontaminateRule)
    markdown: MarkdownRule = Field(default_factory=MarkdownRule)
    languages: dict[str, LanguageProfile] = Field(
        default_factory=lambda: {"zh": chinese_profile()},
        description="ISO 639-1 code -> how that language's documents are judged (word segmentation, stop words, "
        "its own quality and repetition thresholds); languages without a profile use the general rules.",
    )
    examples_per_rule: int = Field(5, ge=0, le=100, description="Examples of removed documents kept per rule in the report.")
    shard_docs: int = Field(20_000, gt=0, description="Documents per output parquet shard.")
    workers: int | None = Field(None, gt=0, description="Worker threads/processes; default: all cores.")


# --------------------------------------------------------------------------------------- validate


class ValidateConfig(Section):
    """Great Expectations suites on data/raw and data/clean; a failed suite fails the stage."""

    raw_suite: str | None = Field(None, description="Suite JSON for raw data; default: the suite shipped with lmpipe.")
    clean_suite: str | None = Field(None, description="Suite JSON for clean data; default: the suite shipped with lmpipe.")
    min_chars: int = Field(1, ge=0, description="Every clean document has at least this many characters.")
    max_chars: int = Field(200_000, gt=0, description="Every clean document has at most this many characters.")
    languages: list[str] = Field(default_factory=lambda: ["en"], description="Languages clean data may contain.")
    min_language_fraction: float = Field(0.99, ge=0, le=1, description="Fraction of clean docs whose language is in `languages`.")
    min_docs: int = Field(100, ge=1, description="Clean data must have at least this many documents.")
    sample_docs: int = Field(
        50_000, ge=1, description="Most rows of any frame given to Great Expectations: the corpus is judged in "
        "streamed batches of this many documents (verdicts from their aggregates), and the Data Docs show a "
        "deterministic sample of this many.")


# ------------------------------------------------------------------------------------------ split


class SplitConfig(Section):
    """Deterministic train/val/test split by hash of `id` (a document never moves between splits)."""

    val_fraction: float = Field(0.05, ge=0, lt=1, description="Share of documents in val.")
    test_fraction: float = Field(0.05, ge=0, lt=1, description="Share of documents in test.")
    salt: str = Field("lmpipe", description="Salt of the split hash; change it to draw a different split.")
    decontaminate_train: bool = Field(True, description="Drop train documents sharing an n-gram with val/test.")
    ngram: int = Field(13, ge=3, description="n-gram size for train decontamination.")

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1 (train would be empty)")
        return self
