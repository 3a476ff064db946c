"""The ``tokenizer`` stage: train a sentencepiece model on the train split.

Reads ``data/split/train`` (parquet document shards) and writes ``artifacts/tokenizer/`` as a whole
(:func:`lmpipe.io.atomic_dir`): ``tokenizer.model`` and ``tokenizer.vocab`` (sentencepiece),
``tokenizer.json`` (fingerprint = sha256 of the model file, vocab size, special token ids),
``hf/`` (a ``transformers`` tokenizer giving the same ids), ``report.json`` and ``manifest.json``;
plus the DVC metrics file ``metrics/tokenizer.json``.

Training text is streamed to sentencepiece line by line in a fixed order (shards by name, documents
in order), sampled here with a seeded generator, and the thread count is cleared from the stored
trainer spec. sentencepiece's unigram trainer splits each EM step into one slice of the corpus per
thread and sums the slices' float counts, so its scores (and so the piece order, i.e. the ids)
depend on the thread count; it therefore always runs with :data:`UNIGRAM_THREADS` slices, whatever
``num_threads`` and the machine's cores (BPE counts exactly and uses ``num_threads``). The same
corpus and config give a byte-identical model, and hence the same fingerprint, on any machine.

Consumers load a trained tokenizer with :func:`load_tokenizer`, which checks the model file
against the recorded fingerprint.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import sentencepiece as spm
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from lmpipe import tracking
from lmpipe.config import Paths
from lmpipe.data.shards import count_documents, iter_shards
from lmpipe.errors import DataError
from lmpipe.io import (
    atomic_dir,
    atomic_write,
    sha256_bytes,
    sha256_file,
    write_bytes,
    write_json,
    write_manifest,
)
from lmpipe.progress import Progress
from lmpipe.tokenizer.config import TokenizerConfig
from lmpipe.tokenizer.report import check_transformers_parity, report_documents, tokenizer_report

log = logging.getLogger(__name__)

MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"
INFO_FILE = "tokenizer.json"
REPORT_FILE = "report.json"
HF_DIR = "hf"
WHITESPACE = "\u2581"  # sentencepiece's visible space


def document_total(directory: Path) -> int | None:
    """Documents in a shard directory from parquet metadata, for progress bars; None if unreadable
    (reading the shards then raises the error that names the bad file)."""
    try:
        return count_documents(directory)
    except (pa.ArrowException, OSError):
        return None


def cpu_count() -> int:
    """Cores this process may run on (respects CPU affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------- training text


def split_long_line(line: str, max_bytes: int) -> Iterator[str]:
    """Cut ``line`` into pieces of at most ``max_bytes`` UTF-8 bytes, at a space where possible."""
    data = line.encode("utf-8")
    while len(data) > max_bytes:
        cut = data.rfind(b" ", 0, max_bytes + 1)
        if cut <= 0:
            cut = max_bytes
            while cut > 0 and (data[cut] & 0xC0) == 0x80:  # never cut inside a UTF-8 sequence
                cut -= 1
        head, data = data[:cut], data[cut:]
        if head.strip():
            yield head.decode("utf-8")
    if data.strip():
        yield data.decode("utf-8")


@dataclass
class CorpusStats:
    documents: int = 0
    lines: int = 0
    bytes: int = 0
    sampled_lines: int = 0
    error: BaseException | None = None


def training_lines(train_dir: Path, max_bytes: int, stats: CorpusStats) -> Iterator[str]:
    """Yield the non-blank lines of every train document in a fixed order, long lines cut.

    Sentencepiece trains on lines (a newline is never inside a piece; it is encoded by its byte
    piece), so documents are split at ``\\n``. Counts go into ``stats``. An error while reading is
    stored in ``stats.error`` and ends the stream, because an exception cannot cross
    sentencepiece's C++ training loop intact; the caller re-raises it.
    """
    total = document_total(train_dir)
    columns = [TextColumn("tokenizer: reading train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    try:
        with Progress(*columns, transient=True, console=Console(stderr=True), unit="docs") as progress:
            task = progress.add_task("read", total=total)
            for _, table in iter_shards(train_dir):
                for text in table.column("text").to_pylist():
                    stats.documents += 1
                    for line in text.split("\n"):
                        if not line.strip():
                            continue
                        for piece in split_long_line(line, max_bytes):
                            stats.lines += 1
                            stats.bytes += len(piece.encode("utf-8"))
                            yield piece
                progress.update(task, completed=stats.documents)
    except Exception as err:  # noqa: BLE001 - re-raised by train_sentencepiece
        stats.error = err
        return
    log.info("read %d lines (%.1f MB) from %d train documents; sentencepiece is training",
             stats.lines, stats.bytes / 1e6, stats.documents)


# sentencepiece's own default; a constant, not the core count, so unigram models are the same everywhere.
UNIGRAM_THREADS = 16


def training_threads(cfg: TokenizerConfig) -> int:
    """Threads of sentencepiece training: fixed for unigram (see the module docstring),
    ``num_threads`` or all cores for BPE."""
    if cfg.model_type == "unigram":
        return UNIGRAM_THREADS
    return cfg.num_threads or cpu_count()


def trainer_options(cfg: TokenizerConfig, num_threads: int) -> dict[str, Any]:
    """The sentencepiece trainer flags for ``cfg`` (ids 0-3 are unk, bos, eos, pad)."""
    return {
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hard_vocab_limit": cfg.hard_vocab_limit,
        "character_coverage": cfg.character_coverage,
        "byte_fallback": cfg.byte_fallback,
        "split_digits": cfg.split_digits,
        "allow_whitespace_only_pieces": cfg.allow_whitespace_only_pieces,
        "normalization_rule_name": cfg.normalization,
        # Keep text as written: no whitespace squeezing, and no dummy space before the text. Without
        # the dummy prefix, a document start and a line start (after the newline byte) are treated
        # alike, a leading chat marker gets no stray space piece before it, and the transformers
        # export reproduces sentencepiece's ids exactly.
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": False,
        "input_sentence_size": 0,  # sampled by sample_lines
        "max_sentence_length": cfg.max_sentence_length,
        "num_threads": num_threads,
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": 3,
        "unk_piece": cfg.unk_piece,
        "bos_piece": cfg.bos_piece,
        "eos_piece": cfg.eos_piece,
        "pad_piece": cfg.pad_piece,
        "user_defined_symbols": list(cfg.special_tokens),
        "minloglevel": 0 if log.isEnabledFor(logging.DEBUG) else 2,
    }


def _sentencepiece_reason(err: RuntimeError) -> str:
    """sentencepiece's message without its source location: 'INTERNAL: x.cc(744) [cond] reason'."""
    text = str(err).strip()
    return text.rsplit("] ", 1)[-1] if "] " in text else text


def sample_lines(lines: Iterator[str], size: int, shuffle: bool, seed: int) -> list[str]:
    """At most ``size`` lines of ``lines``: a uniform sample (reservoir, Vitter's algorithm R) with
    ``shuffle``, else the first ones. The sample depends only on the lines and ``seed``.

    Done here rather than by sentencepiece: its own sampling draws from a generator that
    ``set_random_generator_seed`` does not make reproducible across processes.
    """
    rng = random.Random(seed)
    reservoir: list[str] = []
    for idx, line in enumerate(lines):
        if idx < size:
            reservoir.append(line)
        elif not shuffle:
            break
        else:
            slot = rng.randrange(idx + 1)
            if slot < size:
                reservoir[slot] = line
    return reservoir


def train_sentencepiece(cfg: TokenizerConfig, train_dir: Path) -> tuple[bytes, CorpusStats]:
    """Train on the lines of ``train_dir``; return the serialized model and corpus counts.

    Raises DataError if the split has no text, cannot be read, or sentencepiece rejects it (for
    example a vocabulary larger than the corpus supports).
    """
    stats = CorpusStats()
    lines: Iterator[str] = training_lines(train_dir, cfg.max_sentence_length, stats)
    if cfg.input_sentence_size:
        sample = sample_lines(lines, cfg.input_sentence_size, cfg.shuffle_input_sentence, cfg.seed)
        stats.sampled_lines = len(sample)
        lines = iter(sample)
    first = next(lines, None)
    if stats.error is not None:
        raise stats.error
    if first is None:
        raise DataError(
            "no text to train the tokenizer on: the train split has no non-blank lines "
            "(check the clean and split stages' reports)",
            path=str(train_dir),
        )
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], lines), model_writer=writer,
            **trainer_options(cfg, training_threads(cfg)),
        )
    except RuntimeError as err:
        if stats.error is not None:
            raise stats.error from None
        reason = _sentencepiece_reason(err)
        if "required_chars" in reason:  # the vocabulary cannot even hold the bytes, specials and characters
            hint = "raise tokenizer.vocab_size or lower tokenizer.character_coverage"
        else:
            hint = "lower tokenizer.vocab_size, set tokenizer.hard_vocab_limit: false, or add training text"
        raise DataError(f"sentencepiece could not train on this corpus: {reason} ({hint})",
                        path=str(train_dir)) from None
    if stats.error is not None:
        raise stats.error
    model = parse_model(writer.getvalue())
    # The thread count is a property of the machine, not of the model: clear it so the same
    # corpus and config give the same bytes (and fingerprint) everywhere.
    model.trainer_spec.ClearField("num_threads")
    return model.SerializeToString(deterministic=True), stats


# -------------------------------------------------------------------------------------- export

# sentencepiece ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_BPE = 2  # TrainerSpec.ModelType


def parse_model(model_bytes: bytes) -> Any:
    """Parse a serialized sentencepiece model into its protobuf (``ModelProto``)."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    model.ParseFromString(model_bytes)
    return model


def write_vocab(path: Path, model: Any) -> None:
    """Write ``piece<TAB>score`` per line, in id order (sentencepiece's .vocab format)."""
    with atomic_write(path, "w", encoding="utf-8") as handle:
        for piece in model.pieces:
            handle.write(f"{piece.piece}\t{piece.score:g}\n")


def _bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """Merge rules reproducing sentencepiece BPE with a rank-based BPE.

    Sentencepiece merges, at each step, the adjacent pair whose concatenation is the
    highest-scoring piece; ranking every (left, right) split of each normal piece by that piece's
    score (ties by id) gives a rank-based BPE the same choices.
    """
    normal = {piece: idx for idx, (piece, _, kind) in enumerate(pieces) if kind == NORMAL}
    merges = []
    for piece, idx in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-pieces[idx][1], idx, cut, left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def transformers_backend(model: Any) -> Any:
    """A ``tokenizers.Tokenizer`` giving sentencepiece's ids for this model.

    Exact for BPE. For unigram, exact except on text that literally contains the string of a
    control, unknown or byte piece (such as ``<|endoftext|>`` or ``<0x41>``): sentencepiece never
    matches those pieces in text, the ``tokenizers`` unigram model cannot exclude them.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    pieces = [(p.piece, p.score, p.type) for p in model.pieces]
    spec = model.trainer_spec
    backend: models.Model
    if spec.model_type == MODEL_BPE:
        vocab = {piece: idx for idx, (piece, _, _) in enumerate(pieces)}
        backend = models.BPE(vocab=vocab, merges=_bpe_merges(pieces), unk_token=pieces[spec.unk_id][0],
                             fuse_unk=True, byte_fallback=spec.byte_fallback)
    else:
        # Non-normal pieces get the lowest normal score: the unknown-character penalty of both
        # libraries is "lowest score - 10", computed over normal pieces by sentencepiece and over
        # every piece by tokenizers.
        lowest = min(score for _, score, kind in pieces if kind == NORMAL)
        scores = [(piece, score if kind == NORMAL else lowest) for piece, score, kind in pieces]
        backend = models.Unigram(scores, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    tokenizer = Tokenizer(backend)
    steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", WHITESPACE)]
    if model.normalizer_spec.precompiled_charsmap:
        steps.insert(0, normalizers.Precompiled(model.normalizer_spec.precompiled_charsmap))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(WHITESPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    # User-defined symbols are matched anywhere in text, as sentencepiece does; control pieces
    # are registered as special tokens but, like in sentencepiece, never matched in text.
    tokenizer.add_tokens([AddedToken(p, normalized=False, special=False) for p, _, k in pieces if k == USER_DEFINED])
    tokenizer.add_special_tokens([AddedToken(p, normalized=False, special=True)
                                  for p, _, k in pieces if k in (CONTROL, UNKNOWN)])
    tokenizer.encode_special_tokens = True
    return tokenizer


def export_transformers(model: Any, directory: Path) -> None:
    """Write a tokenizer ``transformers.AutoTokenizer.from_pretrained(directory)`` loads.

    ``split_special_tokens`` is on, so a document that literally contains ``<|endoftext|>`` is
    encoded as text, as sentencepiece and the token shards do, instead of as the EOS id.
    """
    from transformers import PreTrainedTokenizerFast

    spec = model.trainer_spec
    user = [p.piece for p in model.pieces if p.type == USER_DEFINED]
    wrapper = PreTrainedTokenizerFast(
        tokenizer_object=transformers_backend(model),
        unk_token=spec.unk_piece, bos_token=spec.bos_piece, eos_token=spec.eos_piece, pad_token=spec.pad_piece,
        extra_special_tokens=user, split_special_tokens=True, clean_up_tokenization_spaces=False,
    )
    wrapper.save_pretrained(str(directory))


# ------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class TokenizerInfo:
    """What ``tokenizer.json`` records about a trained tokenizer."""

    directory: Path
    fingerprint: str
    vocab_size: int
    model_type: str
    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int
    special_tokens: dict[str, int]

    @property
    def model_file(self) -> Path:
        return self.directory / MODEL_FILE


def read_tokenizer_info(directory: str | os.PathLike[str]) -> TokenizerInfo:
    """Read ``tokenizer.json`` of a tokenizer directory (raises DataError if it is missing)."""
    import json

    directory = Path(directory)
    path = directory / INFO_FILE
    if not path.is_file():
        raise DataError("no tokenizer.json: train the tokenizer first (`dvc repro tokenizer` or `lmpipe tokenizer`)",
                        path=str(directory))
    data = json.loads(path.read_text(encoding="utf-8"))
    ids = data["special_ids"]
    return TokenizerInfo(directory, data["fingerprint"], data["vocab_size"], data["model_type"],
                         ids["unk"], ids["bos"], ids["eos"], ids["pad"], dict(data["special_tokens"]))


def load_tokenizer(directory: str | os.PathLike[str]) -> tuple[spm.SentencePieceProcessor, TokenizerInfo]:
    """Load the sentencepiece model of a tokenizer directory, checked against its fingerprint.

    Raises DataError if the directory is incomplete or the model file is not the one recorded.
    """
    info = read_tokenizer_info(directory)
    if not info.model_file.is_file():
        raise DataError(f"{MODEL_FILE} is missing (re-run `dvc repro tokenizer`)", path=str(info.directory))
    actual = sha256_file(info.model_file)
    if actual != info.fingerprint:
        raise DataError(f"{MODEL_FILE} has sha256 {actual} but tokenizer.json records {info.fingerprint}: "
                        "the directory is corrupt or was edited; re-run `dvc repro tokenizer`", path=str(info.directory))
    return spm.SentencePieceProcessor(model_file=str(info.model_file)), info


def normalized_text(sp: spm.SentencePieceProcessor, text: str) -> str:
    """The text ``sp.decode(sp.encode(text))`` gives back (with byte_fallback): the normalised text.

    With identity normalization that is ``text`` itself, except that sentencepiece's visible
    space character U+2581 comes back as a plain space.
    """
    return sp.normalize(text).replace(WHITESPACE, " ")


# ----------------------------------------------------------------------------------- the stage


def run(cfg: TokenizerConfig, paths: Paths) -> dict[str, Any]:
    """Train the tokenizer on ``paths.split/train`` and write ``paths.tokenizer`` and its metrics.

    Raises DataError for an empty or unreadable train split or a corpus sentencepiece rejects.
    """
    train_dir = paths.split / "train"
    model_bytes, corpus = train_sentencepiece(cfg, train_dir)
    model = parse_model(model_bytes)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    fingerprint = sha256_bytes(model_bytes)
    if sp.vocab_size() < cfg.vocab_size:
        log.warning("the corpus supports only %d pieces, fewer than tokenizer.vocab_size=%d",
                    sp.vocab_size(), cfg.vocab_size)
    docs, report_split, languages = report_documents(paths.split, cfg.report_max_bytes)
    report = tokenizer_report(sp, docs, cfg.top_tokens, num_threads=cfg.num_threads or cpu_count(), languages=languages)
    report["split"] = report_split
    special = {piece: sp.piece_to_id(piece) for piece in cfg.special_tokens}
    info: dict[str, Any] = {
        "fingerprint": fingerprint,
        "vocab_size": sp.vocab_size(),
        "model_type": cfg.model_type,
        "normalization": cfg.normalization,
        "byte_fallback": cfg.byte_fallback,
        "add_dummy_prefix": False,
        "special_ids": {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()},
        "special_pieces": {"unk": cfg.unk_piece, "bos": cfg.bos_piece, "eos": cfg.eos_piece, "pad": cfg.pad_piece},
        "special_tokens": special,
        "files": {"model": MODEL_FILE, "vocab": VOCAB_FILE, "transformers": HF_DIR + "/"},
        "training": {"documents": corpus.documents, "lines": corpus.lines, "bytes": corpus.bytes,
                     "sampled_lines": corpus.sampled_lines or corpus.lines, "seed": cfg.seed},
    }
    with atomic_dir(paths.tokenizer) as tmp:
        write_bytes(tmp / MODEL_FILE, model_bytes)
        write_vocab(tmp / VOCAB_FILE, model)
        export_transformers(model, tmp / HF_DIR)
        report["transformers_parity"] = check_transformers_parity(sp, tmp / HF_DIR, docs)
        write_json(tmp / INFO_FILE, info)
        write_json(tmp / REPORT_FILE, report)
        write_manifest(tmp, stage="tokenizer", config=cfg, inputs={"train": train_dir},
                       counts={"vocab_size": sp.vocab_size(), **info["training"]}, extra={"fingerprint": fingerprint})
    metrics = {key: value for key, value in report.items() if isinstance(value, int | float)}
    metrics["vocab_size"] = sp.vocab_size()
    write_json(paths.metrics / "tokenizer.json", metrics)
    tracker = tracking.active()
    tracker.log_dict(report, "tokenizer_report.json")
    tracker.set_tags({"tokenizer.fingerprint": fingerprint})
    log.info("tokenizer %s: %d pieces, %.2f bytes/token on %s", fingerprint[:12], sp.vocab_size(),
             report["bytes_per_token"], report_split)
    return {**metrics, "train_lines": corpus.lines, "train_bytes": corpus.bytes,
            "artifacts": [str(paths.tokenizer), str(paths.metrics / "tokenizer.json")]}
