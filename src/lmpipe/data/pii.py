"""Personal data in text: e-mail addresses, IPv4 addresses, phone numbers (international, North
American, European national, mainland China mobiles and landlines) and mainland China resident ID
numbers, replaced by placeholders (``<EMAIL>``, ``<IP_ADDRESS>``, ``<PHONE>``, ``<ID_NUMBER>``).

Patterns are Rust regular expressions run by polars over the documents that can match (the flags
of :func:`lmpipe.data.textstats.scan_flags`); ID numbers are also checked against their check
character, which no pattern can test, in Python for the few candidates.
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl

from lmpipe.data.config import PiiRule
from lmpipe.data.textstats import HAS_AT, HAS_DIGIT_DOT, HAS_DIGITS, scan_flags

EMAIL_PATTERN = r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4_PATTERN = rf"(?-u:\b){_OCTET}(?:\.{_OCTET}){{3}}(?-u:\b)"
# Phone numbers: international (+CC ...), a parenthesised area code, NNN-NNN-NNNN / NNN.NNN.NNNN, or
# a national number with a trunk 0 in groups (020 7946 0018). Plain digit runs and other
# space-separated numbers are left alone (years, quantities, ids).
# Mainland China (MIIT numbering plan): mobiles are 11 digits from 13-19, written whole or 3-4-4,
# with or without +86 / 0086; landlines a trunk 0 and a 2-3 digit area code, a dash, 7-8 digits.
# ASCII word boundaries: a CJK character next to a digit is a boundary, a longer digit run is not.
PHONE_PATTERN = (
    r"\+[0-9]{1,3}[ .\-]?(?:\([0-9]{1,4}\)[ .\-]?)?[0-9]{1,4}(?:[ .\-]?[0-9]{2,4}){2,4}(?-u:\b)"
    r"|\([0-9]{2,4}\)[ .\-]?[0-9]{3,4}[ .\-][0-9]{3,4}(?-u:\b)"
    r"|(?-u:\b)[0-9]{3}[.\-][0-9]{3}[.\-][0-9]{4}(?-u:\b)"
    r"|(?-u:\b)0[0-9]{2,4}[ \-][0-9]{3,4}[ \-][0-9]{3,4}(?-u:\b)"
    r"|(?-u:\b)(?:0086[ \-]?)?1[3-9][0-9](?:[0-9]{8}|[ \-][0-9]{4}[ \-][0-9]{4})(?-u:\b)"
    r"|(?-u:\b)0[1-9][0-9]{1,2}-[0-9]{7,8}(?-u:\b)"
)
# Resident ID numbers (GB 11643-1999): 6-digit region code, birth date YYYYMMDD, 3-digit sequence
# and an ISO 7064 MOD 11-2 check character (0-9 or X); matches with a wrong check digit are kept.
ID_NUMBER_PATTERN = (r"(?-u:\b)[1-9][0-9]{5}(?:18|19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])"
                     r"[0-9]{3}[0-9Xx](?-u:\b)")
# the same pattern for Python's re (the check digit is tested there): lookarounds for the boundaries
_ID_NUMBER_RE = re.compile(ID_NUMBER_PATTERN.replace("(?-u:\\b)", r"(?<![0-9A-Za-z_])", 1)
                           .replace("(?-u:\\b)", r"(?![0-9A-Za-z_])"))
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_PII_NEEDS = {"email": HAS_AT, "ip": HAS_DIGIT_DOT, "phone": HAS_DIGITS, "id_number": HAS_DIGITS}
# (kind, pattern, placeholder), applied in this order: e-mails first, since they may hold digits,
# ID numbers before phones
PII_KINDS = (
    ("email", EMAIL_PATTERN, "<EMAIL>"),
    ("ip", IPV4_PATTERN, "<IP_ADDRESS>"),
    ("id_number", ID_NUMBER_PATTERN, "<ID_NUMBER>"),
    ("phone", PHONE_PATTERN, "<PHONE>"),
)


def redact_pii(texts: pl.Series, cfg: PiiRule, flags: np.ndarray | None = None) -> tuple[pl.Series, dict[str, int], np.ndarray]:
    """Replace e-mails, IPv4 addresses and phone numbers with placeholders.

    Returns the new texts, matches per kind, and a mask of the documents that changed. Only
    documents that can match (``flags`` from :func:`scan_flags`: an '@', digits) are searched,
    and only those with a match go through the replacement.
    """
    flags = scan_flags(texts.to_arrow()) if flags is None else flags
    texts = texts.clone()  # scatter below works in place; the caller's series stays as it was
    modified = np.zeros(len(texts), np.bool_)
    counts: dict[str, int] = {}
    wanted = {"email": cfg.email, "ip": cfg.ip, "phone": cfg.phone, "id_number": cfg.id_number}
    for kind, pattern, placeholder in PII_KINDS:
        counts[kind] = 0
        candidates = np.flatnonzero(flags & _PII_NEEDS[kind])
        if not (cfg.enabled and wanted[kind]) or len(candidates) == 0:
            continue
        hits = texts.gather(candidates).str.count_matches(pattern).fill_null(0).to_numpy()
        rows = candidates[hits > 0]
        if len(rows) == 0:
            continue
        if kind == "id_number":  # the check digit decides, which a pattern cannot test
            found, replaced = _redact_id_numbers(texts.gather(rows).to_list(), placeholder)
            rows, texts_out = rows[found > 0], pl.Series([t for t, n in zip(replaced, found, strict=True) if n],
                                                         dtype=pl.String)
            counts[kind] = int(found.sum())
        else:
            counts[kind] = int(hits.sum())
            texts_out = texts.gather(rows).str.replace_all(pattern, placeholder, literal=False)
        if len(rows) == 0:
            continue
        modified[rows] = True
        texts = texts.scatter(rows, texts_out)
    return texts, counts, modified


def valid_id_number(number: str) -> bool:
    """Whether an 18-character resident ID number has the right ISO 7064 MOD 11-2 check character."""
    total = sum(int(digit) * weight for digit, weight in zip(number[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == number[17].upper()


def _redact_id_numbers(texts: list[str], placeholder: str) -> tuple[np.ndarray, list[str]]:
    """(valid ID numbers per text, texts with them replaced by ``placeholder``)."""
    found = np.zeros(len(texts), np.int64)
    out = []
    for idx, text in enumerate(texts):
        def swap(match: re.Match[str], idx: int = idx) -> str:
            if valid_id_number(match.group(0)):
                found[idx] += 1
                return placeholder
            return match.group(0)
        out.append(_ID_NUMBER_RE.sub(swap, text))
    return found, out
