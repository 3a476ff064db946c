"""The cleaning checks of the ``clean`` stage, declared once, as rows of one table.

A row names its params key (``clean.<section>.<key>``), its default and description, the
statistic it reads and how it compares. Everything else derives from :data:`CHECKS`: the config
fields of ``clean.quality``, ``clean.repetition`` and ``clean.lines`` (:mod:`lmpipe.data.config`,
so also ``lmpipe clean --help``), the rule names and their order in ``clean_report.json``, and the
evaluation in :mod:`lmpipe.data.rules`. Adding a Gopher check over an existing statistic is one row.

Statistics (``stat``) are ``"a"`` or ``"a/b"`` over the per-document columns that
:func:`lmpipe.data.rules.document_stats` derives from the compiled textstats pass
(:data:`lmpipe.data.textstats.DOC_STATS`, with words recounted per language profile), and for
``lines`` rows over the per-line columns of :func:`lmpipe.data.textstats.line_stats`.

Comparisons: ``min`` fails when the statistic is below the limit, ``max`` when above it, ``flag``
(a boolean key) fails where the statistic is non-zero while the key is true. ``scope`` limits a
document check to some documents: ``words`` (not CJK text counted per character, which has no word
lengths), ``stop_words`` (documents whose language has stop words). ``target`` of a ``lines`` row:
``line`` removes the line, ``doc`` drops the document when a line that the rows before it kept has it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

Group = Literal["quality", "repetition", "lines"]


@dataclass(frozen=True)
class Check:
    group: Group
    key: str
    stat: str
    op: Literal["min", "max", "flag"]
    default: int | float | bool
    description: str
    scope: Literal["all", "words", "stop_words"] = "all"
    target: Literal["doc", "line"] = "doc"
    bounds: tuple[tuple[str, float], ...] = (("ge", 0),)  # pydantic constraints of the params value

    @property
    def name(self) -> str:
        """The rule's name in clean_report.json and the stage's metrics."""
        return f"{self.group}.{self.key}"


FRACTION = (("ge", 0.0), ("le", 1.0))
POSITIVE = (("gt", 0),)

CHECKS: tuple[Check, ...] = (
    # Gopher quality rules (Rae et al. 2021, appendix A.1.1); defaults are the paper's thresholds
    Check("quality", "min_words", "words", "min", 50, "Gopher: at least 50 words."),
    Check("quality", "max_words", "words", "max", 100_000, "Gopher: at most 100,000 words.", bounds=POSITIVE),
    Check("quality", "min_mean_word_length", "word_chars/words", "min", 3.0,
          "Gopher: mean word length >= 3 characters.", scope="words"),
    Check("quality", "max_mean_word_length", "word_chars/words", "max", 10.0,
          "Gopher: mean word length <= 10 characters.", scope="words", bounds=POSITIVE),
    Check("quality", "max_symbol_word_ratio", "symbols/words", "max", 0.1, "Gopher: '#' and '...' per word <= 0.1."),
    Check("quality", "max_ellipsis_line_fraction", "ellipsis_lines/lines", "max", 0.3,
          "Gopher: lines ending in '...' <= 30%.", bounds=FRACTION),
    Check("quality", "max_bullet_line_fraction", "bullet_lines/lines", "max", 0.9,
          "Gopher: lines starting with a bullet <= 90%.", bounds=FRACTION),
    Check("quality", "min_alpha_word_fraction", "alpha_words/tokens", "min", 0.8,
          "Gopher: >= 80% of words contain a letter.", bounds=FRACTION),
    Check("quality", "min_stop_words", "stop_words", "min", 2,
          "Gopher: at least 2 of the, be, to, of, and, that, have, with (English; other languages count the "
          "`stop_words` of their clean.languages profile, or skip the check).", scope="stop_words"),
    # Gopher repetition rules (Rae et al. 2021, table A1); the n-gram families are RepetitionRule's dicts
    Check("repetition", "max_dup_line_fraction", "dup_lines/lines", "max", 0.30, "Duplicate lines / lines.",
          bounds=FRACTION),
    Check("repetition", "max_dup_para_fraction", "dup_paras/paras", "max", 0.30,
          "Duplicate paragraphs / paragraphs.", bounds=FRACTION),
    Check("repetition", "max_dup_line_char_fraction", "dup_line_chars/chars", "max", 0.20,
          "Characters in duplicate lines / characters.", bounds=FRACTION),
    Check("repetition", "max_dup_para_char_fraction", "dup_para_chars/chars", "max", 0.20,
          "Characters in duplicate paragraphs / characters.", bounds=FRACTION),
    # C4 line filters (Raffel et al. 2020, section 2.2; datatrove's C4QualityFilter): lines are taken
    # in order, stripped, and the first row that matches decides; the document keeps the other lines
    Check("lines", "max_word_length", "longest_word", "max", 1000,
          "Remove lines with a word longer than this many characters.", target="line", bounds=POSITIVE),
    Check("lines", "terminal_punctuation", "no_terminal_punct", "flag", True,
          "Remove lines that do not end in . ? ! \" or ' (or end in '...'), after Wikipedia citations such as "
          "[1], [edit], [citation needed] are removed.", target="line"),
    Check("lines", "min_words_per_line", "words", "min", 3, "Remove lines with fewer words than this.",
          target="line"),
    Check("lines", "lorem_ipsum", "lorem_ipsum", "flag", True, "Drop documents with a line containing 'lorem ipsum'."),
    Check("lines", "javascript", "javascript", "flag", True, "Remove lines containing 'javascript'.", target="line"),
    Check("lines", "curly_braces", "curly_brace", "flag", True, "Drop documents with a line containing '{'."),
    Check("lines", "policy", "policy", "flag", True,
          "Remove cookie and policy boilerplate lines (terms of use, privacy policy, cookie policy, uses cookies, "
          "use of cookies, use cookies).", target="line"),
)
# after the line filters: what must remain of a document (C4: at least 5 sentences)
MIN_SENTENCES = Check("lines", "min_sentences", "sentences", "min", 5,
                      "Drop documents with fewer sentences than this in the lines that remain.")
LINE_CHECKS = tuple(c for c in CHECKS if c.group == "lines")
LINE_RULES = tuple(c for c in LINE_CHECKS if c.target == "line")  # they remove lines, reported as counts


def checks_of(group: Group) -> tuple[Check, ...]:
    return tuple(c for c in (*CHECKS, MIN_SENTENCES) if c.group == group)


def declare_fields(namespace: dict[str, Any], group: Group) -> None:
    """Add a pydantic field per check of ``group`` to a class body being defined (``locals()``)."""
    annotations = namespace.setdefault("__annotations__", {})
    for check in checks_of(group):
        kind = type(check.default)
        annotations[check.key] = kind
        if kind is bool:
            namespace[check.key] = Field(check.default, description=check.description)
        else:
            constraints: dict[str, Any] = dict(check.bounds)
            namespace[check.key] = Field(check.default, description=check.description, **constraints)
