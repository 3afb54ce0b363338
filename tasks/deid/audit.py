"""Residual-PHI audit: look for the original's identifying values in the encoded output.

The audit's rules (the README's conformance statement quotes them):

1. **What is looked for.** The original values are collected while the object is de-identified
   (``Originals`` in ``pacsflow.tasks.deid.deidentifier``): patient names and IDs, birth date,
   accession number, addresses, institution, device serial, every person name at any depth, and
   replaced UIDs. Each is searched whole, and person names also by component (5 characters or
   more; 2 for non-ASCII scripts), in every encoding it may take (the original bytes, UTF-8,
   Latin-1 and the object's character set, ISO 2022 escapes included), case-insensitively, as a
   whole word.
2. **Where.** In the encoded Part 10 bytes: every header, sequence, private block and the file
   meta. Pixel data is searched only for long values (8 bytes or more) of names and IDs, to avoid
   chance matches in image bytes. A clean object costs this one byte search.
3. **Located.** Only when the byte search finds something, the de-identified dataset is walked
   and every element (at any depth, item indexes included) whose value, as written, contains an
   original value is named by its path, e.g. ``PersonName found in (0008,1032)[0]>(0008,0104)
   CodeMeaning``. Messages carry source keywords and attribute paths, never a value. A hit in
   pixel data is named ``(7FE0,0010) PixelData``; one that no element explains is reported as
   found in bytes outside any element (and is a leak).
4. **Not a leak** (does not quarantine) only when all of these hold for the element it was
   found in:

   - the profile retains it unchanged: its action, and the action of every sequence enclosing
     it, is K, or it is a standard attribute that Table E.1-1 does not list (so the
     de-identifier did not touch it); never a private attribute, an overlay or curve group, the
     file meta, a person name (PN), a value of unknown VR (UN: it may hold anything) or one of
     the identifying attributes the audit collects;
   - its output value equals its own original value, compared with the snapshot of its
     dataset taken before the walk;
   - every original value it contains is a single component of a person name, not a whole
     identifying value (a full name, a one-part name, a patient ID, an accession number, a
     UID, ...), and no second component of that same name occurs in the element (a full name
     copied into a retained text, in any order, is a leak).

   Also not a leak: the attributes the de-identifier writes itself from its own constant text
   (PatientIdentityRemoved, DeidentificationMethod, DeidentificationMethodCodeSequence,
   LongitudinalTemporalInformationModified at the top level), where a name that happens to be
   a word of that text ("Patient", "Option") is a coincidence, not an original value.

   So a physician "Philips^Anna" does not quarantine a Manufacturer "Philips Medical Systems",
   nor a family name "Pelvis" a BodyPartExamined "PELVIS" or a retained code meaning "Pelvis";
   everything else still raises ``ResidualPHIError``, naming every offending path.
"""

from __future__ import annotations

import re
from functools import lru_cache
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from pacsflow.tasks.deid.deidentifier import IDENTIFYING_KEYWORDS, Originals, encoded_forms
from pacsflow.tasks.core.errors import DeidentificationError

_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")
_PIXEL_ELEMENTS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
_PIXEL_MIN = 8
_PIXEL_DATA = BaseTag(0x7FE00010)
_SHOWN = 8  # reasons named in one error message
# Written by the de-identifier after the walk, from its own constants (E.1.1 step 6).
_METHOD_TAGS = frozenset({0x00120062, 0x00120063, 0x00120064, 0x00280303})
_IDENTIFYING = frozenset(int(t) for t in IDENTIFYING_KEYWORDS)
_WORD_EDGE = (rb"(?<![a-z0-9_])", rb"(?![a-z0-9_])")  # a name "Here" must not match "Manufacturer name here"
# A study's objects share their values: their patterns are compiled once here, not left to re's
# own cache, which other libraries in the process can flush.
_compile = lru_cache(maxsize=256)(re.compile)
_PERSON_STR = re.compile(r"[\^= ,]+")
_PERSON_BYTES = re.compile(rb"[\^= ,]+")
_COMPONENT_STR = re.compile(r"[\^=]+")
_COMPONENT_BYTES = re.compile(rb"[\^=]+")
_UID_FORM = re.compile(rb"\d+(?:\.\d+)+")
_WORD_BYTE = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_")  # what _WORD_EDGE must not see beside a match


class ResidualPHIError(DeidentificationError):
    """An original identifying value survived de-identification: the object must not leave."""

    reason = "residual-phi"


# Values worth looking for inside pixel bytes too (long names and IDs, not UIDs or dates).
_PIXEL_KEYWORDS = frozenset({"PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames",
                             "PatientBirthName", "AccessionNumber", "PersonName"})


@dataclass
class _Needles:
    """The search forms of one object's originals (lower case), with the keyword each came from.
    UIDs are looked for one by one (each object has its own: a pattern holding them would be
    compiled afresh for every object), the study's shared values through one cached pattern."""

    pattern: re.Pattern[bytes] | None
    uids: list[bytes]
    owner: dict[bytes, str]
    pixel_forms: dict[bytes, str]

    def found_in(self, low: bytes) -> set[bytes]:
        found = {m.group(0) for m in self.pattern.finditer(low)} if self.pattern is not None else set()
        return found | {u for u in self.uids if _occurs(u, low)}


def _needles(originals: Originals) -> _Needles | None:
    owner: dict[bytes, str] = {}
    pixel_forms: dict[bytes, str] = {}
    for keyword, tokens in sorted(originals.tokens().items()):
        for token in tokens:
            for form in encoded_forms(token, originals.encodings):
                owner.setdefault(form.lower(), keyword)
                if keyword in _PIXEL_KEYWORDS and len(form) >= _PIXEL_MIN:
                    pixel_forms.setdefault(form, keyword)
    if not owner:
        return None
    uids = [f for f in owner if _UID_FORM.fullmatch(f)]
    shared = [f for f in owner if not _UID_FORM.fullmatch(f)]
    return _Needles(_words(shared) if shared else None, uids, owner, pixel_forms)


def _words(forms: Iterable[bytes]) -> re.Pattern[bytes]:
    """Any of ``forms`` as a whole word, the longest first (a full name before its components)."""
    alt = b"|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
    return _compile(_WORD_EDGE[0] + rb"(?:" + alt + rb")" + _WORD_EDGE[1])


@dataclass(frozen=True)
class AuditHit:
    """An original value found in the output: the keyword it came from, the attribute path that
    holds it, and whether it is a leak under the audit's rules. Carries no value."""

    source: str
    where: str
    leak: bool

    @property
    def reason(self) -> str:
        return f"{self.source} found in {self.where}"


def audit_hits(data: bytes, originals: Originals | None, ds: Dataset | None = None) -> list[AuditHit]:
    """Every original value found in ``data``, located and judged (empty when the bytes are clean).

    ``ds`` is the de-identified Dataset ``data`` was encoded from; without it hits are not
    located and every one is a leak."""
    if originals is None or not originals.values:
        return []
    needles = _needles(originals)
    if needles is None:
        return []
    cut = _pixel_start(data, ds)
    header = (data[:cut] if cut > 0 else data).lower()
    pixels = data[cut:] if cut > 0 else b""
    found = needles.found_in(header)
    hits = set()
    if pixels:
        label = _path((), int.from_bytes(pixels[:2], "little") << 16 | int.from_bytes(pixels[2:4], "little"))
        hits = {AuditHit(kw, label, True) for form, kw in needles.pixel_forms.items() if form in pixels}
    if found:
        hits |= _located(found, needles, originals, ds)
    return sorted(hits, key=lambda h: (h.where, h.source))


def _pixel_start(data: bytes, ds: Dataset | None) -> int:
    """Where the pixel data element starts in ``data`` (-1: none). Known from the dataset when
    its native pixel data ends the bytes (no search through the image); else the last tag."""
    elem = ds._dict.get(_PIXEL_DATA) if ds is not None else None
    value = getattr(elem, "value", None)
    undefined = elem.length == 0xFFFFFFFF if isinstance(elem, RawDataElement) else getattr(elem, "is_undefined_length", True)
    if isinstance(value, (bytes, bytearray)) and not undefined:
        n = len(value) + (len(value) & 1)
        for header in (12, 8):  # explicit VR OB/OW, implicit VR
            start = len(data) - n - header
            if start > 0 and data[start:start + 4] == _PIXEL_TAGS[0]:
                return start
    return max(data.rfind(t) for t in _PIXEL_TAGS)


def audit_bytes(data: bytes, originals: Originals | None, ds: Dataset | None = None) -> list[str]:
    """Why ``data`` must not leave: the PHI-free reasons of its leaks (empty when clean)."""
    return [h.reason for h in audit_hits(data, originals, ds) if h.leak]


def audit_or_raise(data: bytes, originals: Originals | None, ds: Dataset | None = None) -> None:
    reasons = audit_bytes(data, originals, ds)
    if reasons:
        # a name copied into every frame's functional groups would make a ledger line per frame
        more = f"; and {len(reasons) - _SHOWN} more" if len(reasons) > _SHOWN else ""
        raise ResidualPHIError("residual identifier after de-identification: " + "; ".join(reasons[:_SHOWN]) + more)


def _located(found: set[bytes], needles: _Needles, originals: Originals, ds: Dataset | None) -> set[AuditHit]:
    """The byte search's hits, by the path of the element holding each, judged by rule 4."""
    unlocated = {AuditHit(needles.owner[f], "the encoded object (not located)", True) for f in found}
    if ds is None:
        return unlocated
    try:
        return _judged(found, needles, originals, ds)
    except (ValueError, TypeError, LookupError, AttributeError, NotImplementedError):
        return unlocated  # an element that cannot be read back: every hit counts


def _judged(found: set[bytes], needles: _Needles, originals: Originals, ds: Dataset) -> set[AuditHit]:
    judge = _Judge(originals)
    hits: set[AuditHit] = set()
    explained: set[bytes] = set()
    pattern = _words(found)  # the forms the byte search found: a shorter alternation, a faster scan
    for where in _elements(ds):
        low = _value_bytes(where.elem, where.encodings).lower()
        matched = {m.group(0) for m in pattern.finditer(low)}
        if not matched:
            continue
        explained |= matched
        leak = not judge.benign(where, low, matched)
        hits.update(AuditHit(needles.owner[f], where.label, leak) for f in matched)
    hits.update(AuditHit(needles.owner[f], "bytes outside any element", True) for f in found - explained)
    return hits


@dataclass
class _Where:
    """One element of the output: its enclosing sequences, its dataset and its path."""

    chain: tuple[int, ...]
    tag: int
    elem: Any
    container: Dataset
    encodings: Any
    label: str


def _path(labels: tuple[str, ...], tag: int) -> str:
    keyword = "private" if (tag >> 16) & 1 else keyword_for_tag(tag)
    return ">".join(labels + (f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword}".rstrip(),))


def _vr(elem: Any, tag: int) -> str:
    """As the walk reads it: the dictionary's VR for implicit or UN-encoded standard elements."""
    if elem.VR and (elem.VR != "UN" or (tag >> 16) & 1):
        return str(elem.VR).split(" or ")[0]
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        return "UN"


def _elements(ds: Dataset) -> Iterator[_Where]:
    """Every leaf element of the output, top-level pixel data aside (searched on its own)."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        yield from _leaves(meta, ds._character_set, (), ())
    yield from _leaves(ds, ds._character_set, (), ())


def _leaves(ds: Dataset, encodings: Any, chain: tuple[int, ...], labels: tuple[str, ...]) -> Iterator[_Where]:
    for tag in list(ds._dict):
        t = int(tag)
        if not chain and t in _PIXEL_ELEMENTS:
            continue
        elem = ds._dict[tag]
        items = ds[tag].value if _vr(elem, t) == "SQ" else None  # ds[tag]: a sequence still raw is parsed
        if not isinstance(items, Sequence):
            yield _Where(chain, t, elem, ds, encodings, _path(labels, t))
            continue
        for i, item in enumerate(items):
            enc = item._character_set if 0x00080005 in item._dict else encodings
            yield from _leaves(item, enc, chain + (t,), labels + (f"({t >> 16:04X},{t & 0xFFFF:04X})[{i}]",))


def _value_bytes(elem: Any, encodings: Any) -> bytes:
    """The element's value as the writer puts it in the file (raw elements are copied as read)."""
    if isinstance(elem, RawDataElement):
        return bytes(elem.value or b"")
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True  # 8-byte header, any VR
    try:
        write_data_element(fp, elem, encodings)
    except (ValueError, TypeError, LookupError, OverflowError, NotImplementedError):
        return str(elem.value).encode("utf-8", "replace")
    return bytes(fp.getvalue()[8:])


def _split(value: str | bytes, str_re: re.Pattern[str], bytes_re: re.Pattern[bytes]) -> list[Any]:
    parts: list[Any] = bytes_re.split(value) if isinstance(value, bytes) else str_re.split(value)
    return [p.strip() for p in parts if len(p.strip()) >= 2]


@dataclass
class _Judge:
    """Rule 4 of the module docstring, for one object's originals."""

    originals: Originals
    wholes: set[bytes] = field(default_factory=set)  # forms that are a whole identifying value
    persons: dict[bytes, list[list[set[bytes]]]] = field(default_factory=dict)  # component form -> names

    def __post_init__(self) -> None:
        for keyword, values in self.originals.values.items():
            for value in values:
                if isinstance(value, bytes) and b"\x1b" in value:
                    continue  # ISO 2022: its decoded form is in the values too, and split there
                self.wholes |= self._forms(value.strip(b"\x00 ") if isinstance(value, bytes) else value.strip())
                if keyword in self.originals.names:
                    for person in (value.split(b"\\") if isinstance(value, bytes) else value.split("\\")):
                        self._add_person(person)

    def _forms(self, token: str | bytes) -> set[bytes]:
        return {f.lower() for f in encoded_forms(token, self.originals.encodings)} if token else set()

    def _add_person(self, person: str | bytes) -> None:
        self.wholes |= self._forms(person.strip())
        words = [self._forms(c) for c in _split(person, _PERSON_STR, _PERSON_BYTES)]
        keys = set().union(*words, *(self._forms(c) for c in _split(person, _COMPONENT_STR, _COMPONENT_BYTES)))
        if len(words) < 2:
            self.wholes |= keys  # a one-part name is the whole name
            return
        for key in keys:
            self.persons.setdefault(key, []).append(words)

    def benign(self, where: _Where, low: bytes, matched: set[bytes]) -> bool:
        if (where.chain[0] if where.chain else where.tag) in _METHOD_TAGS:
            return True
        return self._retained(where) and self._unchanged(where) and all(self._lone_component(f, low) for f in matched)

    def _retained(self, where: _Where) -> bool:
        actions = self.originals.actions
        for t in where.chain + (where.tag,):
            g = t >> 16
            if g & 1 or g == 2 or t & 0xFFFF == 0 or (g & 0xFF00) in (0x5000, 0x6000):
                return False
            if actions.get(t, "K") != "K":
                return False
        return where.tag not in _IDENTIFYING and _vr(where.elem, where.tag) not in ("PN", "UN")

    def _unchanged(self, where: _Where) -> bool:
        held = self.originals.snapshots.get(id(where.container))
        if held is None or held[0] is not where.container:
            return False
        before = held[1].get(BaseTag(where.tag))
        if before is None:
            return False
        if before is where.elem:
            return True  # elements are replaced, never edited, by the walk
        old = _value_bytes(before, where.encodings).rstrip(b"\x00 ")
        return old == _value_bytes(where.elem, where.encodings).rstrip(b"\x00 ")

    def _lone_component(self, form: bytes, low: bytes) -> bool:
        if form in self.wholes or form not in self.persons:
            return False
        for words in self.persons[form]:
            present = sum(1 for forms in words if any(_occurs(f, low) for f in forms))
            if present >= 2:
                return False
        return True


def _occurs(form: bytes, low: bytes) -> bool:
    """Whether ``form`` occurs in ``low`` as a whole word (as ``_WORD_EDGE`` says), without compiling
    a pattern for it."""
    start = low.find(form)
    while start >= 0:
        end = start + len(form)
        if (start == 0 or low[start - 1] not in _WORD_BYTE) and (end == len(low) or low[end] not in _WORD_BYTE):
            return True
        start = low.find(form, start + 1)
    return False
