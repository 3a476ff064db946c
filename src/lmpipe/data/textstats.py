"""Compiled text statistics shared by the cleaning rules, dedup and decontamination.

One pass over the UTF-8 bytes of a batch of documents (an Arrow string array, zero-copy) splits
each document into tokens and lines and records what every rule needs, so no rule loops over words
in Python. The loops are numba-compiled (``cache=True``: compiled once per machine, then loaded).

Tokens are maximal runs of non-space characters, except that each CJK ideograph or kana is a token
of its own: Chinese and Japanese have no spaces, and treating a whole sentence as one "word" would
make every word-based rule meaningless for them. CJK punctuation separates tokens like a space.
This per-character split is the fallback for CJK text without a word segmenter (Japanese; Korean
separates words with spaces and needs none); Chinese documents are segmented into words with
jieba first and tokenized with ``split_cjk=False`` (:func:`lmpipe.data.segment.segment_words`).

Each token gets a 64-bit hash of its *normalised* form: letters and digits only, ASCII and Latin-1
letters lower-cased. So ``"The,"`` and ``"the"`` hash alike, which is what exact dedup (case and
punctuation insensitive), MinHash shingles, decontamination n-grams and stop-word counts want.
A token with no letter or digit (``"--"``, ``"#"``) hashes its raw characters and is flagged
``EMPTY_NORM``; dedup and decontamination skip such tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import pyarrow as pa

# token flags
HAS_LETTER = np.uint8(1)
IS_CJK = np.uint8(2)
EMPTY_NORM = np.uint8(4)

# per-document columns of TokenizedBatch.doc_stats
DOC_STATS = (
    "chars", "words", "word_chars", "alpha_words", "cjk_words", "hashes", "ellipses",
    "lines", "ellipsis_lines", "bullet_lines", "dup_lines", "dup_line_chars",
    "paras", "dup_paras", "dup_para_chars",
)
COL = {name: idx for idx, name in enumerate(DOC_STATS)}

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
# odd 64-bit multiplier of the polynomial n-gram hash (any large odd constant works)
NGRAM_BASE = np.uint64(0x9E3779B97F4A7C15)
_PARA_SALT = np.uint64(0xA0761D6478BD642F)
_SET_MAX_CHARS = 12  # word-set members (stop words, function words) are short; skip longer tokens

# character classes; JOINED_CJK..PUNCT are the characters of a token (one range test in the kernel)
# JOINED_CJK: a CJK character inside a word of pre-segmented text (tokenize(split_cjk=False))
SEP, JOINED_CJK, LETTER, DIGIT, PUNCT, CJK = 0, 1, 2, 3, 4, 5
_ASCII_CLASS = np.full(128, PUNCT, dtype=np.uint8)
_ASCII_CLASS[[9, 10, 11, 12, 13, 32]] = SEP
_ASCII_CLASS[:9] = SEP
_ASCII_CLASS[14:32] = SEP
_ASCII_CLASS[ord("0"): ord("9") + 1] = DIGIT
_ASCII_CLASS[ord("a"): ord("z") + 1] = LETTER
_ASCII_CLASS[ord("A"): ord("Z") + 1] = LETTER
# bullets that start list lines (Gopher's bullet-line rule): - * • ‣ ⁃ ◦ ● ○ ■ □ ▪ ·
_BULLETS = np.array([0x2D, 0x2A, 0x2022, 0x2023, 0x2043, 0x25E6, 0x25CF, 0x25CB, 0x25A0, 0x25A1,
                     0x25AA, 0xB7], dtype=np.int64)


@numba.njit(cache=True, nogil=True, inline="always")
def mix64(x: np.uint64) -> np.uint64:
    """splitmix64 finaliser: spreads hash bits so table slots and MinHash inputs are uniform."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit(cache=True, nogil=True, inline="always")
def gather_words(tok_hash: np.ndarray, tok_flags: np.ndarray, start: int, end: int, buf: np.ndarray) -> int:
    """Copy the hashes of tokens ``start:end`` that have a normalised form (words, not bare
    punctuation) into ``buf``; return how many. The word sequence n-gram kernels hash."""
    m = 0
    for k in range(start, end):
        if not tok_flags[k] & EMPTY_NORM:
            buf[m] = tok_hash[k]
            m += 1
    return m


@numba.njit(cache=True, nogil=True)
def char_class(cp: int, ascii_class: np.ndarray) -> int:
    if cp < 128:
        return ascii_class[cp]
    if cp == 0x85 or cp == 0xA0 or cp == 0x1680 or 0x2000 <= cp <= 0x200A or cp == 0x2028 \
            or cp == 0x2029 or cp == 0x202F or cp == 0x205F or cp == 0x3000:
        return SEP
    if 0x3040 <= cp <= 0x30FF or 0x3400 <= cp <= 0x4DBF or 0x4E00 <= cp <= 0x9FFF \
            or 0xF900 <= cp <= 0xFAFF or 0x20000 <= cp <= 0x2FA1F:
        return CJK
    # CJK and full-width punctuation separate tokens like spaces do
    if cjk_punctuation(cp):
        return SEP
    # Latin-1 punctuation, general punctuation, currency, symbols, arrows, box drawing, emoji
    if cp < 0xC0 or cp == 0xD7 or cp == 0xF7 or 0x2010 <= cp <= 0x2BFF or 0xFE00 <= cp <= 0xFE0F \
            or 0x1F000 <= cp <= 0x1FAFF or 0xFFF0 <= cp <= 0xFFFF:
        return PUNCT
    return LETTER


@numba.njit(cache=True, nogil=True, inline="always")
def cjk_punctuation(cp: int) -> bool:
    """CJK and full-width punctuation (char_class: SEP)."""
    return 0x3001 <= cp <= 0x303F or 0xFF01 <= cp <= 0xFF0F or 0xFF1A <= cp <= 0xFF20 \
        or 0xFF3B <= cp <= 0xFF40 or 0xFF5B <= cp <= 0xFF65


@numba.njit(cache=True, nogil=True, inline="always")
def _decode(data: np.ndarray, i: int, end: int) -> tuple[np.int64, int]:
    """Code point at byte ``i`` and its byte length (input is valid UTF-8; bounds still checked)."""
    b0 = np.int64(data[i])
    if b0 < 0x80:
        return b0, 1
    if b0 < 0xE0 and i + 1 < end:
        return ((b0 & 0x1F) << 6) | (np.int64(data[i + 1]) & 0x3F), 2
    if b0 < 0xF0 and i + 2 < end:
        return ((b0 & 0x0F) << 12) | ((np.int64(data[i + 1]) & 0x3F) << 6) | (np.int64(data[i + 2]) & 0x3F), 3
    if i + 3 < end:
        return (((b0 & 0x07) << 18) | ((np.int64(data[i + 1]) & 0x3F) << 12)
                | ((np.int64(data[i + 2]) & 0x3F) << 6) | (np.int64(data[i + 3]) & 0x3F)), 4
    return np.int64(0xFFFD), 1


@numba.njit(cache=True, nogil=True, inline="always")
def _lower(cp: int) -> int:
    if 0x41 <= cp <= 0x5A or (0xC0 <= cp <= 0xDE and cp != 0xD7):
        return cp + 0x20
    return cp


@numba.njit(cache=True, nogil=True, inline="always")
def count_insert(keys: np.ndarray, stamps: np.ndarray, counts: np.ndarray, mask: int, stamp: int,
                 key: np.uint64) -> int:
    """Add one to ``key``'s count in an open-addressing table; slots of older stamps are empty."""
    i = np.int64(key & np.uint64(mask))
    while True:
        if stamps[i] != stamp:
            stamps[i] = stamp
            keys[i] = key
            counts[i] = 1
            return 1
        if keys[i] == key:
            counts[i] += 1
            return counts[i]
        i = (i + 1) & mask


@numba.njit(cache=True, nogil=True, inline="always")
def count_get(keys: np.ndarray, stamps: np.ndarray, counts: np.ndarray, mask: int, stamp: int,
              key: np.uint64) -> int:
    i = np.int64(key & np.uint64(mask))
    while stamps[i] == stamp:
        if keys[i] == key:
            return counts[i]
        i = (i + 1) & mask
    return 0


@numba.njit(cache=True, nogil=True)
def table_mask(n: int) -> int:
    size = 16
    while size < 2 * n:
        size *= 2
    return size - 1


@numba.njit(cache=True, nogil=True)
def _line_dups(hashes: np.ndarray, chars: np.ndarray, n: int, keys: np.ndarray, stamps: np.ndarray,
               counts: np.ndarray, stamp: int) -> tuple[int, int]:
    """(duplicates, characters in duplicates) of n line/paragraph hashes; first occurrences count as unique."""
    mask = table_mask(n)
    dup = 0
    dup_chars = 0
    for k in range(n):
        if count_insert(keys, stamps, counts, mask, stamp, hashes[k]) > 1:
            dup += 1
            dup_chars += chars[k]
    return dup, dup_chars


@numba.njit(cache=True, nogil=True, inline="always")
def _ends_with_ellipsis(data: np.ndarray, start: int, end: int) -> bool:
    """Does ``data[start:end]`` end with '...' or U+2026 (UTF-8 E2 80 A6)?"""
    if end - start < 3:
        return False
    if data[end - 1] == 0x2E and data[end - 2] == 0x2E and data[end - 3] == 0x2E:
        return True
    return data[end - 3] == 0xE2 and data[end - 2] == 0x80 and data[end - 1] == 0xA6


@numba.njit(cache=True, nogil=True)
def _tokenize(data, offsets, ascii_class, bullets, tok_hash, tok_chars, tok_flags, tok_offsets, stats,
              keys, stamps, counts, line_hash, line_chars, para_hash, para_chars, set_hashes, set_bits,
              set_filter, set_counts, split_cjk):  # pragma: no cover - compiled
    n_docs = offsets.shape[0] - 1
    t = 0
    stamp = 0
    for d in range(n_docs):
        start, end = offsets[d], offsets[d + 1]
        tok_offsets[d] = t
        chars = 0
        in_tok = False
        tok_start = 0
        h = _FNV_OFFSET
        n_chars = 0
        flags = np.uint8(0)
        hashes = 0
        ellipses = 0
        dots = 0
        n_lines = 0
        n_paras = 0
        line_first = -1
        line_last_end = -1
        first_cp = -1
        lchars_first = 0
        lchars_last = 0
        lh = np.uint64(0)
        ell_lines = 0
        bullet_lines = 0
        p_hash = np.uint64(0)
        p_chars = 0
        p_lines = 0
        i = start
        while i <= end:
            if i < end:
                b0 = data[i]
                if b0 < 0x80:
                    cp = np.int64(b0)
                    nb = 1
                    cls = ascii_class[b0]
                else:
                    cp, nb = _decode(data, i, end)
                    cls = char_class(cp, ascii_class)
                    if not split_cjk:  # pre-segmented text: ideographs join into words, and
                        if cls == CJK:  # CJK punctuation is a token (a non-word, as datatrove counts it)
                            cls = JOINED_CJK
                        elif cls == SEP and cjk_punctuation(cp):
                            cls = PUNCT
            else:
                cp, nb, cls = 10, 1, SEP  # a virtual newline closes the last token and line
            if cp != 0x2E:
                dots = 0
            if JOINED_CJK <= cls <= PUNCT:  # letter, digit or punctuation: part of a token
                if not in_tok:
                    in_tok = True
                    tok_start = i
                    h = _FNV_OFFSET
                    n_chars = 0
                    flags = EMPTY_NORM
                n_chars += 1
                if cls != PUNCT:
                    h = (h ^ np.uint64(_lower(cp))) * _FNV_PRIME
                    flags &= ~EMPTY_NORM
                    if cls == LETTER:
                        flags |= HAS_LETTER
                    elif cls == JOINED_CJK:
                        flags |= HAS_LETTER | IS_CJK
                elif cp == 0x23:  # '#', Gopher's symbol-to-word ratio
                    hashes += 1
                elif cp == 0x2E:
                    dots += 1
                    if dots == 3:
                        ellipses += 1
                        dots = 0
                elif cp == 0x2026:
                    ellipses += 1
                if line_first < 0:
                    line_first = i
                    first_cp = cp
                    lchars_first = chars
                line_last_end = i + nb
                lchars_last = chars + 1
            else:
                if in_tok:
                    if flags & EMPTY_NORM:  # no letter or digit: hash the raw characters instead
                        h = _FNV_OFFSET
                        for k in range(tok_start, i):
                            h = (h ^ np.uint64(data[k])) * _FNV_PRIME
                    th = mix64(h)
                    tok_hash[t] = th
                    tok_chars[t] = n_chars
                    tok_flags[t] = flags
                    t += 1
                    in_tok = False
                    lh = lh * NGRAM_BASE + th
                    if n_chars <= _SET_MAX_CHARS and set_filter[(th >> np.uint64(6)) & np.uint64(63)] \
                            & (np.uint64(1) << (th & np.uint64(63))):
                        pos = np.searchsorted(set_hashes, th)
                        if pos < set_hashes.shape[0] and set_hashes[pos] == th:
                            for k in range(set_counts.shape[1]):
                                if set_bits[pos] & (1 << k):
                                    set_counts[d, k] += 1
                if cls == CJK:
                    th = mix64((_FNV_OFFSET ^ np.uint64(cp)) * _FNV_PRIME)
                    tok_hash[t] = th
                    tok_chars[t] = 1
                    tok_flags[t] = HAS_LETTER | IS_CJK
                    t += 1
                    lh = lh * NGRAM_BASE + th
                    if line_first < 0:
                        line_first = i
                        first_cp = cp
                        lchars_first = chars
                    line_last_end = i + nb
                    lchars_last = chars + 1
                elif cp == 10:
                    # lines are compared by their tokens (stripped, case and punctuation kept apart)
                    if line_first >= 0:
                        lh = mix64(lh)
                        lc = lchars_last - lchars_first
                        line_hash[n_lines] = lh
                        line_chars[n_lines] = lc
                        n_lines += 1
                        if _ends_with_ellipsis(data, line_first, line_last_end):
                            ell_lines += 1
                        for b in bullets:
                            if first_cp == b:
                                bullet_lines += 1
                                break
                        p_hash = p_hash * NGRAM_BASE + lh
                        p_chars += lc
                        p_lines += 1
                    elif p_lines > 0:  # a blank line ends the paragraph
                        para_hash[n_paras] = mix64(p_hash ^ _PARA_SALT)
                        para_chars[n_paras] = p_chars
                        n_paras += 1
                        p_hash = np.uint64(0)
                        p_chars = 0
                        p_lines = 0
                    line_first = -1
                    lh = np.uint64(0)
            if i < end:
                chars += 1
            i += nb
        if p_lines > 0:
            para_hash[n_paras] = mix64(p_hash ^ _PARA_SALT)
            para_chars[n_paras] = p_chars
            n_paras += 1
        t0 = tok_offsets[d]
        word_chars = 0
        alpha = 0
        cjk = 0
        for k in range(t0, t):
            word_chars += tok_chars[k]
            if tok_flags[k] & HAS_LETTER:
                alpha += 1
            if tok_flags[k] & IS_CJK:
                cjk += 1
        stamp += 1
        dl, dlc = _line_dups(line_hash, line_chars, n_lines, keys, stamps, counts, stamp)
        stamp += 1
        dp, dpc = _line_dups(para_hash, para_chars, n_paras, keys, stamps, counts, stamp)
        row = stats[d]
        row[0] = chars
        row[1] = t - t0
        row[2] = word_chars
        row[3] = alpha
        row[4] = cjk
        row[5] = hashes
        row[6] = ellipses
        row[7] = n_lines
        row[8] = ell_lines
        row[9] = bullet_lines
        row[10] = dl
        row[11] = dlc
        row[12] = n_paras
        row[13] = dp
        row[14] = dpc
    tok_offsets[n_docs] = t
    return t


# flags of scan_flags: which (costlier) rewrites a document may need
HAS_CR, HAS_CONTROL, HAS_NON_ASCII, HAS_AT, HAS_DIGITS, HAS_DIGIT_DOT = 1, 2, 4, 8, 16, 32
_MIN_PHONE_DIGITS = 6  # the shortest phone number the PII patterns accept has 6 digits


@numba.njit(cache=True, nogil=True)
def _scan_flags(data, offsets, out):  # pragma: no cover - compiled
    for d in range(offsets.shape[0] - 1):
        start, end = offsets[d], offsets[d + 1]
        high = 0
        digits = 0
        at = 0
        cr = 0
        control = 0
        digit_dot = 0
        prev_digit = 0
        for i in range(start, end):  # branch-free, so it vectorises
            b = np.int64(data[i])
            digit = np.int64(48 <= b <= 57)
            high |= b >> 7
            digits += digit
            at |= np.int64(b == 0x40)
            cr |= np.int64(b == 0x0D)
            control |= np.int64((b < 0x20 and b != 0x09 and b != 0x0A) or b == 0x7F)
            digit_dot |= prev_digit & np.int64(b == 0x2E)
            prev_digit = digit
        flags = HAS_NON_ASCII * high + HAS_AT * at + HAS_CR * cr + HAS_CONTROL * control + HAS_DIGIT_DOT * digit_dot
        if digits >= _MIN_PHONE_DIGITS:
            flags |= HAS_DIGITS
        if high and not control:
            # C1 controls (C2 80-9F), zero-width space (E2 80 8B), word joiner (E2 81 A0), BOM (EF BB BF)
            for i in range(start, end - 1):
                b, c = data[i], data[i + 1]
                if (b == 0xC2 and 0x80 <= c <= 0x9F) or (i + 2 < end and (
                        (b == 0xE2 and c == 0x80 and data[i + 2] == 0x8B)
                        or (b == 0xE2 and c == 0x81 and data[i + 2] == 0xA0)
                        or (b == 0xEF and c == 0xBB and data[i + 2] == 0xBF))):
                    flags |= HAS_CONTROL
                    break
        out[d] = flags


def scan_flags(texts: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
    """Per document, HAS_* bits saying which rewrites can change it (one fast pass over the bytes)."""
    data, offsets = utf8_buffers(texts)
    out = np.zeros(len(offsets) - 1, np.uint8)
    _scan_flags(data, offsets, out)
    return out


@dataclass
class TokenizedBatch:
    """Tokens and per-document statistics of a batch of documents.

    ``tok_hash[tok_offsets[d]:tok_offsets[d + 1]]`` are document ``d``'s token hashes (likewise
    ``tok_chars``, ``tok_flags``); ``doc_stats[d, COL[name]]`` its counts (see ``DOC_STATS``);
    ``set_counts[d, k]`` how many of its tokens belong to the k-th word set given to :func:`tokenize`.
    """

    tok_hash: np.ndarray
    tok_chars: np.ndarray
    tok_flags: np.ndarray
    tok_offsets: np.ndarray
    doc_stats: np.ndarray
    set_counts: np.ndarray

    def __len__(self) -> int:
        return self.doc_stats.shape[0]

    def stat(self, name: str) -> np.ndarray:
        return self.doc_stats[:, COL[name]]


def utf8_buffers(texts: pa.Array | pa.ChunkedArray | list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, offsets) of a string array without copying the text (nulls read as empty)."""
    if isinstance(texts, list):
        texts = pa.array(texts, pa.large_string())
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks() if texts.num_chunks != 1 else texts.chunk(0)
    if texts.type != pa.large_string():
        texts = texts.cast(pa.large_string())
    if texts.null_count:
        texts = texts.fill_null("")
    _, off_buf, data_buf = texts.buffers()
    offsets = np.frombuffer(off_buf, dtype=np.int64)[texts.offset: texts.offset + len(texts) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return data, offsets


def tokenize(texts: pa.Array | pa.ChunkedArray | list[str], word_sets: tuple[np.ndarray, ...] = (), *,
             split_cjk: bool = True) -> TokenizedBatch:
    """Tokenize a batch of documents and count what the rules need (one compiled pass over the bytes).

    ``word_sets`` are arrays of token hashes (from :func:`token_hashes`); occurrences of each set's
    words are counted per document. With ``split_cjk`` (the default) every CJK character is a token
    of its own; without it CJK characters join like letters, for text already segmented into
    space-separated words (Chinese through jieba, see :mod:`lmpipe.data.segment`), and CJK punctuation
    is a token of its own (no letter) as in datatrove's word counts. A one-character word hashes the
    same either way. Reads only the given array; allocates token arrays bounded
    by the batch's byte size.
    """
    if len(word_sets) > 8:
        raise ValueError("at most 8 word sets")
    union = np.unique(np.concatenate([np.asarray(ws, np.uint64) for ws in word_sets])) if word_sets \
        else np.zeros(0, np.uint64)
    bits = np.zeros(len(union), np.int64)
    for k, ws in enumerate(word_sets):
        bits[np.isin(union, ws)] |= 1 << k
    # 4096-bit filter in front of the sorted lookup: almost every token misses it at once
    set_filter = np.zeros(64, np.uint64)
    np.bitwise_or.at(set_filter, (union >> np.uint64(6)) & np.uint64(63), np.uint64(1) << (union & np.uint64(63)))
    data, offsets = utf8_buffers(texts)
    n_docs = len(offsets) - 1
    n_bytes = int(offsets[-1] - offsets[0]) if n_docs else 0
    # a token is at least one byte followed by a separator, or a 3-byte CJK character
    max_tokens = n_bytes // 2 + n_docs + 1
    longest = int(np.max(np.diff(offsets))) if n_docs else 0
    max_lines = longest // 2 + 2  # a line is at least one byte plus its newline
    size = table_mask(max_lines) + 1
    tok_hash = np.empty(max_tokens, np.uint64)
    tok_chars = np.empty(max_tokens, np.int32)
    tok_flags = np.empty(max_tokens, np.uint8)
    tok_offsets = np.empty(n_docs + 1, np.int64)
    stats = np.zeros((n_docs, len(DOC_STATS)), np.float64)
    set_counts = np.zeros((n_docs, len(word_sets)), np.float64)
    used = _tokenize(
        data, offsets, _ASCII_CLASS, _BULLETS, tok_hash, tok_chars, tok_flags, tok_offsets, stats,
        np.empty(size, np.uint64), np.zeros(size, np.int64), np.empty(size, np.int32),
        np.empty(max_lines, np.uint64), np.empty(max_lines, np.int64),
        np.empty(max_lines, np.uint64), np.empty(max_lines, np.int64),
        union, bits, set_filter, set_counts, split_cjk,
    )
    return TokenizedBatch(tok_hash[:used], tok_chars[:used], tok_flags[:used], tok_offsets, stats, set_counts)


def token_hashes(words: list[str], *, split_cjk: bool = True) -> np.ndarray:
    """Normalised hash of each given word (as the tokenizer would hash it), e.g. for stop words;
    0 for an entry that is not one token (``split_cjk`` as in :func:`tokenize`)."""
    batch = tokenize(words, split_cjk=split_cjk)
    out = np.zeros(len(words), np.uint64)
    for idx in range(len(words)):
        lo, hi = batch.tok_offsets[idx], batch.tok_offsets[idx + 1]
        if hi - lo == 1:
            out[idx] = batch.tok_hash[lo]
    return out


# ------------------------------------------------------------------------------------ C4 lines

# per-line columns of LineStats.stats, and the bits of the "flags" column
LINE_STATS = ("words", "longest_word", "sentences", "no_terminal_punct", "lorem_ipsum", "javascript",
              "curly_brace", "policy")
LINE_COL = {name: idx for idx, name in enumerate(LINE_STATS)}
# what the phrase columns look for (ASCII case-insensitive); policy: C4's boilerplate phrases
_PHRASES = {
    "lorem_ipsum": (b"lorem ipsum",), "javascript": (b"javascript",), "curly_brace": (b"{",),
    "policy": (b"terms of use", b"privacy policy", b"cookie policy", b"uses cookies", b"use of cookies", b"use cookies"),
}
_CLOSERS = np.frombuffer(b"\"')]", np.uint8)  # may follow a sentence's final . ? ! (punkt: 'end.")')
_EDIT = np.frombuffer(b"edit]", np.uint8)
_CITATION_NEEDED = np.frombuffer(b"citation needed]", np.uint8)


@numba.njit(cache=True, nogil=True, inline="always")
def _is_space(cp: int) -> bool:
    """str.isspace()."""
    return cp == 32 or 9 <= cp <= 13 or 28 <= cp <= 31 or cp == 0x85 or cp == 0xA0 or cp == 0x1680 \
        or 0x2000 <= cp <= 0x200A or cp == 0x2028 or cp == 0x2029 or cp == 0x202F or cp == 0x205F or cp == 0x3000


@numba.njit(cache=True, nogil=True, inline="always")
def _is_line_break(cp: int) -> bool:
    """A line boundary of str.splitlines()."""
    return 10 <= cp <= 13 or 28 <= cp <= 30 or cp == 0x85 or cp == 0x2028 or cp == 0x2029


@numba.njit(cache=True, nogil=True)
def _citation_at(data: np.ndarray, i: int, end: int) -> int:
    """Length of a Wikipedia citation ('[12]', '[]', '[edit]', '[citation needed]') at byte ``i``, else 0."""
    if data[i] != 0x5B:
        return 0
    j = i + 1
    while j < end and 0x30 <= data[j] <= 0x39:
        j += 1
    if j < end and data[j] == 0x5D:
        return j + 1 - i
    for word in (_EDIT, _CITATION_NEEDED):
        n = word.shape[0]
        if i + 1 + n <= end:
            ok = True
            for k in range(n):
                if data[i + 1 + k] != word[k]:
                    ok = False
                    break
            if ok:
                return n + 1
    return 0


@numba.njit(cache=True, nogil=True)
def _strip_citations_end(data: np.ndarray, start: int, end: int) -> int:
    """End of ``data[start:end]`` once the citations it ends with are removed."""
    while end > start and data[end - 1] == 0x5D:
        i = end - 1
        while i > start and data[i] != 0x5B:
            i -= 1
        if data[i] != 0x5B or _citation_at(data, i, end) != end - i:
            break
        end = i
    return end


@numba.njit(cache=True, nogil=True)
def _line_stats(data, offsets, select, closers, line_offsets, spans, stats):  # pragma: no cover - compiled
    n_lines = 0
    for d in range(offsets.shape[0] - 1):
        line_offsets[d] = n_lines
        if not select[d]:
            continue
        start, end = offsets[d], offsets[d + 1]
        i = start
        while start < end:
            # one line: [i, j) up to the next break
            j = i
            while j < end:
                cp, nb = _decode(data, j, end)
                if _is_line_break(cp):
                    break
                j += nb
            # strip, count words (runs of non-space), the longest in characters, and sentence ends
            lo, hi = j, i
            words = 0
            longest = 0
            sentences = 0
            in_word = False
            wlen = 0
            wstart = i
            k = i
            last_end_punct = False  # the word just closed ends a sentence (punkt without a model)
            while k <= j:
                if k < j:
                    cp, nb = _decode(data, k, j)
                    space = _is_space(cp)
                else:
                    cp, nb, space = 32, 1, True
                if not space:
                    if not in_word:
                        if last_end_punct:
                            sentences += 1
                        in_word = True
                        wlen = 0
                        wstart = k
                        lo = min(lo, k)
                    wlen += 1
                    hi = k + nb
                elif in_word:
                    in_word = False
                    words += 1
                    longest = max(longest, wlen)
                    # ends in . ? ! (then closing quotes/brackets), not '..', not a number's '1.'
                    e = k
                    while e > wstart and _in(closers, data[e - 1]):
                        e -= 1
                    last = data[e - 1] if e > wstart else 0
                    last_end_punct = last == 0x3F or last == 0x21 or (
                        last == 0x2E and not (e - 2 >= wstart and data[e - 2] == 0x2E) and not _digits(data, wstart, e - 1))
                k += nb
            row = stats[n_lines]
            row[0] = words
            row[1] = longest
            row[2] = sentences + 1 if words else 0
            c_end = _strip_citations_end(data, lo, hi) if hi > lo else hi
            last = data[c_end - 1] if c_end > lo else 0
            terminal = last == 0x2E or last == 0x3F or last == 0x21 or last == 0x22 or last == 0x27
            ellipsis = c_end - lo >= 3 and data[c_end - 1] == 0x2E and data[c_end - 2] == 0x2E and data[c_end - 3] == 0x2E
            row[3] = 1 if (not terminal or ellipsis) else 0
            spans[n_lines, 0] = lo
            spans[n_lines, 1] = max(hi, lo)
            n_lines += 1
            if j >= end:
                break
            _, nb = _decode(data, j, end)
            if data[j] == 13 and j + 1 < end and data[j + 1] == 10:
                nb = 2  # CRLF is one break
            i = j + nb
            if i >= end:  # a final break ends the last line, it does not start one
                break
    line_offsets[offsets.shape[0] - 1] = n_lines
    return n_lines


@numba.njit(cache=True, nogil=True, inline="always")
def _in(values: np.ndarray, b: int) -> bool:
    for v in values:  # noqa: SIM110 - numba compiles loops, not generators
        if v == b:
            return True
    return False


@numba.njit(cache=True, nogil=True, inline="always")
def _digits(data: np.ndarray, start: int, end: int) -> bool:
    """Is ``data[start:end]`` a non-empty run of ASCII digits?"""
    if end <= start:
        return False
    for k in range(start, end):  # noqa: SIM110 - numba compiles loops, not generators
        if not 0x30 <= data[k] <= 0x39:
            return False
    return True


@dataclass
class LineStats:
    """Per-line statistics of the selected documents of a batch: lines
    ``line_offsets[d]:line_offsets[d + 1]`` are document ``d``'s (none when it was not selected);
    ``stats[l, LINE_COL[name]]`` (see ``LINE_STATS``); ``spans[l]`` the stripped line's bytes."""

    data: np.ndarray
    offsets: np.ndarray
    line_offsets: np.ndarray
    spans: np.ndarray
    stats: np.ndarray

    def stat(self, name: str) -> np.ndarray:
        return self.stats[:, LINE_COL[name]]

    def doc_of_line(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.line_offsets) - 1), np.diff(self.line_offsets))


def line_stats(texts: pa.Array | pa.ChunkedArray | list[str], select: np.ndarray | None = None) -> LineStats:
    """Split documents into lines as ``str.splitlines()`` does and measure what the C4 line
    filters read (one compiled pass): words (whitespace-separated), the longest word, sentences
    (boundaries after '.', '?' or '!' ending a word, except '...' and a number's '1.', as punkt
    without a trained model splits), whether the line (stripped, trailing citations removed) ends
    without terminal punctuation, and whether it contains 'lorem ipsum', 'javascript', '{' or a
    cookie/policy phrase (ASCII case-insensitive)."""
    data, offsets = utf8_buffers(texts)
    n_docs = len(offsets) - 1
    select = np.ones(n_docs, np.bool_) if select is None else np.ascontiguousarray(select, np.bool_)
    lo, hi = int(offsets[0]), int(offsets[-1])
    window = data[lo:hi]
    # every document has at most one more line than breaks; a break has one of these bytes
    # (the one-byte breaks, the last byte of U+0085, U+2028, U+2029)
    per_byte = np.bincount(window, minlength=256)
    max_lines = int(per_byte[[10, 11, 12, 13, 28, 29, 30, 0x85, 0xA8, 0xA9]].sum()) + n_docs + 1
    line_offsets = np.zeros(n_docs + 1, np.int64)
    spans = np.empty((max_lines, 2), np.int64)
    stats = np.zeros((max_lines, len(LINE_STATS)), np.int64)
    used = _line_stats(data, offsets, select, _CLOSERS, line_offsets, spans, stats)
    spans, stats = spans[:used], stats[:used]
    # phrases: found in the whole batch at C speed (bytes.find, rare hits), then placed in their lines
    lowered = np.where((window >= 0x41) & (window <= 0x5A), window | 0x20, window).tobytes()
    for name, phrases in _PHRASES.items():
        if name == "curly_brace":
            begin, length = np.flatnonzero(window == 0x7B), np.ones(1, np.int64)
        else:
            found, sizes = [], []
            for phrase in phrases:
                at = lowered.find(phrase)
                while at >= 0:
                    found.append(at)
                    sizes.append(len(phrase))
                    at = lowered.find(phrase, at + 1)
            begin, length = np.array(found, np.int64), np.array(sizes, np.int64)
        if len(begin) == 0 or len(spans) == 0:
            continue
        begin = begin + lo
        line = np.searchsorted(spans[:, 0], begin, side="right") - 1
        inside = (line >= 0) & (begin + length <= spans[np.maximum(line, 0), 1])
        stats[line[inside], LINE_COL[name]] = 1
    return LineStats(data, offsets, line_offsets, spans, stats)


@numba.njit(cache=True, nogil=True)
def _join_lines(data, line_offsets, spans, keep, docs, out, out_offsets):  # pragma: no cover - compiled
    o = 0
    for r in range(docs.shape[0]):
        d = docs[r]
        out_offsets[r] = o
        first = True
        for ln in range(line_offsets[d], line_offsets[d + 1]):
            if not keep[ln]:
                continue
            if not first:
                out[o] = 10
                o += 1
            first = False
            k = spans[ln, 0]
            while k < spans[ln, 1]:
                c = _citation_at(data, k, spans[ln, 1])
                if c:
                    k += c
                    continue
                out[o] = data[k]
                o += 1
                k += 1
    out_offsets[docs.shape[0]] = o


def join_lines(lines: LineStats, keep: np.ndarray, docs: np.ndarray) -> pa.LargeStringArray:
    """The texts of documents ``docs`` rebuilt from their kept lines (stripped, Wikipedia citations
    removed, joined by newlines), as C4 writes them."""
    docs = np.ascontiguousarray(docs, np.int64)
    out = np.empty(int(np.sum(lines.spans[:, 1] - lines.spans[:, 0])) + len(lines.spans) + 1, np.uint8)
    out_offsets = np.empty(len(docs) + 1, np.int64)
    _join_lines(lines.data, lines.line_offsets, lines.spans, np.ascontiguousarray(keep, np.bool_), docs, out,
                out_offsets)
    return pa.LargeStringArray.from_buffers(len(docs), pa.py_buffer(out_offsets), pa.py_buffer(out[: out_offsets[-1]]))
