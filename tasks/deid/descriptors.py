"""Cleaning free text kept under Clean Descriptors: names, IDs and dates go, the rest stays.

A description such as ``"CT head requested by Dr Smith-Jones 12/03/2021 acc 778812"`` must keep
``"CT head"`` and lose everything that points at a person or a day. Two sources of knowledge:

1. **The object's own identifying values** (patient and physician names and their components,
   IDs, accession number, birth date, institution... collected before anything is changed, see
   ``Originals``). Long tokens are removed wherever they occur; short name components (3-4
   letters, e.g. "Lee") only as whole words, so that "Ann" does not eat "Annual".
2. **Patterns**, for what the object does not know (a name typed by a clerk):
   - a personal title (Dr, Prof, Mr, Mrs, Ms...) and the name words after it; in mixed-case text
     the capitalised words (with particles such as "van der"), in all-capitals text at most two
     words. "DR" followed by an imaging word ("DR CHEST") is digital radiography, not a doctor;
   - "requested/referred/ordered/reported/... by" and the name words after it;
   - dates: digits with separators, 8-digit runs, month names with a day or year, and years;
   - identifiers: runs of 6+ digits, tokens holding 5+ consecutive digits, a label (MRN, ID,
     Acc, Accession, Case, Ref, #) followed by a token with a digit, e-mail addresses and
     phone-like digit groups (9+ digits).

The cleaning errs towards removing too much: a lost word in a description costs an analyst
little, a kept name is a breach. The residual-PHI audit still checks the output afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

_TITLES = r"(?:dr|drs|doctor|dott|dra|prof|professor|mr|mrs|ms|miss|mx|herr|frau|mme|mlle|sister|nurse)"
_TITLE = re.compile(r"(?<![\w])" + _TITLES + r"(?![\w])\.?", re.IGNORECASE)
_BY = re.compile(
    r"(?<![\w])(?:(?:requested|referred|ordered|reported|read|dictated|signed|performed|approved|verified|seen)"
    r"\s+)?by(?![\w])",
    re.IGNORECASE,
)
# Written in capitals without a dot these are modalities or diagnoses (MR brain, MS protocol).
_NOT_TITLES = frozenset({"MR", "MS"})
_WORD = re.compile(r"[ \t]*([^\W\d_][\w'\u2019-]*\.?)")
_PARTICLES = frozenset({"van", "von", "der", "den", "de", "da", "di", "del", "della", "du", "la", "le", "bin",
                        "ibn", "al", "el", "ter", "ten", "st", "st."})
# Words that follow "DR" (digital radiography) or a "by" in imaging descriptions: never names.
_IMAGING = frozenset({
    "chest", "thorax", "abdomen", "pelvis", "head", "skull", "spine", "neck", "knee", "hip", "hand", "foot",
    "ankle", "wrist", "elbow", "shoulder", "arm", "leg", "femur", "tibia", "breast", "sinus", "sinuses", "pa",
    "ap", "lat", "lateral", "oblique", "view", "views", "portable", "bedside", "supine", "erect", "standing",
    "contrast", "protocol", "series", "image", "images", "study", "exam", "the", "a", "an", "and", "or", "with",
    "without", "wo", "w", "for", "of", "to", "on", "in", "at", "ct", "mr", "mri", "us", "xr", "cr", "dx", "mg",
    "pet", "nm", "left", "right", "bilateral", "l", "r", "c-spine", "l-spine", "t-spine", "ribs", "mammo",
    "brain", "cardiac", "heart", "lung", "lungs", "liver", "kidney", "renal", "orbit", "orbits", "face", "cervical",
    "thoracic", "lumbar", "sacrum", "abdo", "abd", "extremity", "screening", "diagnostic", "follow-up", "routine",
})
_MONTHS = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
           r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)(?![a-z])\.?")
_DATE_PATTERNS = re.compile(
    "|".join((
        r"\b\d{1,4}[./-]\d{1,2}[./-]\d{2,4}\b",  # 12/03/2021, 2021-03-12, 12.3.21
        r"\b\d{8}(?:\d{6}(?:\.\d+)?)?\b",  # DA and DT
        r"\b\d{1,2}(?:st|nd|rd|th)?[ ./-]*" + _MONTHS + r"(?:[ ./,-]*\d{2,4})?(?![\w])",  # 12 Mar 2021, 12-MAR-21
        r"(?<![\w])" + _MONTHS + r"[ ./-]*\d{1,2}(?:st|nd|rd|th)?(?:,?[ ]*\d{4})?\b",  # March 12, 2021
        r"(?<![\w])" + _MONTHS + r"[ ./-]*\d{4}\b",  # Mar 2021
        r"\b(?:19\d{2}|20[0-3]\d)\b",  # a year on its own (not a 2048 matrix)
    )),
    re.IGNORECASE,
)
_ID_PATTERNS = re.compile(
    "|".join((
        r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",  # e-mail
        r"(?<![\w])(?:mrn|pid|id|acc|accession|case|ref)(?:[ ]*(?:no|nr|number|#))?[ ]*[:#.]?[ ]*"
        r"[\w-]*\d[\w-]*",  # a labelled identifier
        r"#[ ]*[\w-]*\d[\w-]*",
        r"\b[\w-]*\d{5,}[\w-]*\b",  # accession-like tokens and long digit runs
    )),
    re.IGNORECASE,
)
_PHONE = re.compile(r"\+?\(?\d[\d ()-]{7,}\d")
_SPACES = re.compile(r"\s{2,}")
# The objects of a study share their values: their patterns are compiled once here, not left to
# re's own cache, which other libraries in the process (dicognito compiles hundreds) can flush.
_compile = lru_cache(maxsize=256)(re.compile)
_UID_FORM = re.compile(r"\d+(?:\.\d+)+")


@dataclass(frozen=True)
class Scrubber:
    """The object's own values, to remove from its text. Each object has UIDs of its own, so a
    pattern holding them would be compiled afresh for every object (about a millisecond each):
    UIDs are replaced as plain strings (digits and dots have no case), the study's shared
    values through one cached pattern."""

    uids: tuple[str, ...]  # longest first: a UID that extends another goes whole
    pattern: re.Pattern[str] | None

    def sub(self, repl: str, text: str) -> str:
        for uid in self.uids:
            text = text.replace(uid, repl)
        return self.pattern.sub(repl, text) if self.pattern is not None else text


def scrubber(long_tokens: Iterable[str], short_words: Iterable[str]) -> Scrubber | None:
    """The object's own values: long tokens anywhere, short name components (case-insensitive)
    as whole words only. ``None`` when there is nothing to look for."""
    tokens = {t for t in long_tokens if t.strip()}
    uids = sorted({t for t in tokens if _UID_FORM.fullmatch(t)}, key=len, reverse=True)
    longs = sorted(tokens - set(uids), key=len, reverse=True)
    shorts = sorted({w for w in short_words if w.strip()} - tokens, key=len, reverse=True)
    parts = []
    if longs:
        parts.append("|".join(re.escape(t) for t in longs))
    if shorts:
        parts.append(r"(?<![\w])(?:" + "|".join(re.escape(w) for w in shorts) + r")(?![\w])")
    pattern = _compile("|".join(parts), re.IGNORECASE) if parts else None
    return Scrubber(tuple(uids), pattern) if uids or pattern is not None else None


def _name_words(text: str, start: int, capitals: bool, limit: int) -> int:
    """End of the name words that follow ``start`` (``start`` itself when there are none)."""
    end, taken, pos = start, 0, start
    while taken < limit:
        m = _WORD.match(text, pos)
        if m is None:
            break
        word = m.group(1)
        bare = word.rstrip(".").lower()
        if bare in _IMAGING:
            break
        if capitals and bare in _PARTICLES:
            pos = m.end()  # a particle counts only when a capitalised word follows
            continue
        if capitals and not word[0].isupper():
            break
        end = pos = m.end()
        taken += 1
    return end


def _remove_names(text: str, pattern: re.Pattern[str], need_name: bool) -> str:
    out, last = [], 0
    upper = text == text.upper()
    for m in pattern.finditer(text):
        if m.start() < last or m.group(0) in _NOT_TITLES:
            continue
        end = _name_words(text, m.end(), not upper, 2 if upper else 4)
        if end == m.end() and (need_name or _followed_by_imaging(text, end)):
            continue  # "DR CHEST", "performed on CT": not a person
        out.append(text[last:m.start()])
        last = end
    out.append(text[last:])
    return "".join(out)


def _followed_by_imaging(text: str, pos: int) -> bool:
    m = _WORD.match(text, pos)
    return m is not None and m.group(1).rstrip(".").lower() in _IMAGING


def _phones(text: str) -> str:
    return _PHONE.sub(lambda m: "" if sum(c.isdigit() for c in m.group(0)) >= 9 else m.group(0), text)


def clean_descriptor(text: str, own_values: Scrubber | None) -> str:
    """``text`` without the object's own identifying values, names after titles, dates and IDs."""
    if own_values is not None:
        text = own_values.sub(" ", text)
    text = _remove_names(text, _TITLE, need_name=False)
    text = _remove_names(text, _BY, need_name=True)
    text = _ID_PATTERNS.sub(" ", text)
    text = _DATE_PATTERNS.sub(" ", text)
    text = _phones(text)
    return _SPACES.sub(" ", text).strip(" ^,;:-/()")
