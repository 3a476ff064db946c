"""Config sections of the tokenizer stages: ``tokenizer`` (train it) and ``tokenize`` (apply it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmpipe.config import Section

SplitName = Literal["train", "val", "test"]
ALL_SPLITS: tuple[SplitName, ...] = ("train", "val", "test")
DEFAULT_SPECIAL_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


class TokenizerConfig(Section):
    """Sentencepiece tokenizer trained on data/split/train into artifacts/tokenizer/."""

    model_type: Literal["unigram", "bpe"] = Field(
        "unigram",
        description="Segmentation model. 'unigram' (Kudo, 2018) is sentencepiece's default, matches morphology "
        "better than BPE (Bostrom & Durrett, 2020) and encodes several times faster in sentencepiece; "
        "'bpe' (Sennrich et al., 2016) is what Llama-style tokenizers use.",
    )
    vocab_size: int = Field(8192, ge=64, le=1_048_576, description="Number of pieces, specials and the 256 byte pieces included.")
    hard_vocab_limit: bool = Field(
        False,
        description="If false, vocab_size is an upper bound: a corpus too small for it gives a smaller "
        "vocabulary (logged as a warning) instead of an error.",
    )
    character_coverage: float = Field(
        0.9995,
        gt=0,
        le=1,
        description="Share of characters the vocabulary must cover; 0.9995 is sentencepiece's advice for "
        "large character sets (Chinese, Japanese), 1.0 for small alphabets. Rarer characters become byte "
        "pieces (byte_fallback) rather than unknowns.",
    )
    byte_fallback: bool = Field(True, description="Encode characters outside the vocabulary as UTF-8 byte pieces, so no text is ever unknown.")
    split_digits: bool = Field(True, description="Every digit is its own piece (as in PaLM and Llama), which helps arithmetic.")
    allow_whitespace_only_pieces: bool = Field(True, description="Allow pieces made only of spaces (indentation, aligned text).")
    normalization: Literal["identity", "nfkc"] = Field(
        "identity",
        description="'identity' keeps text as is, so decode(encode(text)) == text; 'nfkc' folds compatibility "
        "characters (full-width forms, ligatures) first.",
    )
    input_sentence_size: int = Field(
        2_000_000,
        ge=0,
        description="Train on a sample of at most this many lines (0: all). Sentencepiece holds its "
        "input in memory, so large corpora must be sampled.",
    )
    shuffle_input_sentence: bool = Field(True, description="Sample lines uniformly from the whole corpus (reservoir) rather than taking the first ones.")
    max_sentence_length: int = Field(
        4192,
        ge=64,
        description="Longest training line in bytes; longer lines are cut at a space into several lines "
        "(sentencepiece would otherwise drop them).",
    )
    seed: int = Field(1234, ge=0, description="Seed of the line sample; the same corpus and seed give a byte-identical model.")
    num_threads: int | None = Field(
        None,
        gt=0,
        description="Threads of BPE training and of encoding for the report; default all cores. Unigram training "
        "always uses 16 (its scores depend on the thread count), so the model's bytes never depend on this.",
    )
    unk_piece: str = Field("<|unk|>", min_length=1, description="Unknown piece (id 0); with byte_fallback it is never produced.")
    bos_piece: str = Field("<|startoftext|>", min_length=1, description="Beginning-of-text piece (id 1).")
    eos_piece: str = Field("<|endoftext|>", min_length=1, description="End-of-text piece (id 2), written after every document by the tokenize stage.")
    pad_piece: str = Field("<|pad|>", min_length=1, description="Padding piece (id 3).")
    special_tokens: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS),
        description="Symbols always encoded as one token wherever they appear in text: the chat-role markers "
        "fine-tuning uses, and any others you add. Their ids follow the four above in list order "
        "(4, 5, ...), so they are stable across retrains.",
    )
    report_max_bytes: int = Field(
        20_000_000, gt=0, description="Compute the report (compression, coverage, top tokens) on at most this much val text."
    )
    top_tokens: int = Field(25, ge=0, le=1000, description="Most frequent val tokens listed in the report.")

    @model_validator(mode="after")
    def _distinct_pieces(self) -> TokenizerConfig:
        pieces = [self.unk_piece, self.bos_piece, self.eos_piece, self.pad_piece, *self.special_tokens]
        seen: set[str] = set()
        for piece in pieces:
            if piece in seen:
                raise ValueError(f"special piece {piece!r} is listed twice; every special piece must be distinct")
            if not piece.strip() or any(c.isspace() for c in piece):
                raise ValueError(f"special piece {piece!r} must be non-empty and contain no whitespace")
            seen.add(piece)
        return self


class TokenizeConfig(Section):
    """Encode the splits into token files in data/tokens/ with EOS after every document: one flat
    {split}.bin per split, or one {split}-NNNNN.bin per parquet shard of the split."""

    splits: list[SplitName] = Field(
        default_factory=lambda: list(ALL_SPLITS),
        min_length=1,
        description="Splits of data/split/ to tokenize; each must exist.",
    )
    workers: int | None = Field(None, gt=0, description="Encoding processes; default all cores. 1 encodes in this process.")
    batch_bytes: int = Field(
        1_000_000,
        gt=0,
        description="Text per batch sent to a worker. At most two batches per worker are in flight, which "
        "bounds memory whatever the corpus size.",
    )
    dtype: Literal["auto", "uint16", "uint32"] = Field(
        "auto", description="Token id type on disk; 'auto' picks uint16 when every id fits, else uint32."
    )
    layout: Literal["single", "sharded"] = Field(
        "single",
        description="'single': one {split}.bin per split; 'sharded': one {split}-NNNNN.bin per parquet shard of "
        "data/split/{split}, listed in meta.json with token, document and byte counts and sha256, so "
        "shards are written in parallel (by Ray tasks on engine.kind: ray) and never appended into one "
        "file. Training reads either layout; the tokens are the same.",
    )

    @model_validator(mode="after")
    def _distinct_splits(self) -> TokenizeConfig:
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits lists a split twice: {self.splits}")
        return self
