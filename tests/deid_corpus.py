"""A folder of DICOM objects in which every attribute row of PS3.15 Table E.1-1 holds a value.

Built from the table the project ships (``tasks/deid/data/ps3.15-table-e1-1-2024b.json``, read
through ``load_profile``), for a reviewer's question: does any original value of an attribute the
profile removes, dummies, empties, replaces or cleans survive anywhere in the encoded output?

Every value planted is unique in the corpus and recognisable in bytes:

- text (AE CS SH LO ST LT UT UC): a token ``ZQ<tag>N<5 digits>`` (16 characters, so it fits every
  VR; LO and longer carry a ``Q7 `` prefix); in the non-ASCII objects the longer VRs carry an
  accented token (``ZQ<tag>É<5 digits>``);
- person names: ``Zqfam<n>^Zqgiv<n>`` (accented in the non-ASCII objects), searched whole and by
  component;
- dates: each its own year, two years apart (a patient's day shift is 1..365 days, so a shifted
  date never equals another original), DT with a unique fraction; times with a unique fraction;
- numbers: unique DS/IS values; UIDs ``1.2.826.0.1.3680043.9.9999.<5 digits>``; binary values
  (OB UN OW) hold an ASCII token; US values can only be checked structurally;
- every sequence row holds one item with a Code Sequence macro, a free-text value, a person name
  and a private block (all tokens); the Content Sequence of the SR holds TEXT, CODE, PNAME and
  DATE items, nested in a CONTAINER;
- a 50xx curve, a 60xx overlay and a private block at the top level.

Each planted value is recorded (``Planted``) with whether the profile, under the given
de-identifier's options, must not leave it in the output (``must_go``) and why. Objects: CT, MR
(ISO_IR 192), Secondary Capture with BurnedInAnnotation NO (ISO_IR 100), Comprehensive SR, and an
ultrasound image with BurnedInAnnotation YES (at burned-in risk).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pacsflow.tasks.deid import iod as deid_iod
from pacsflow.tasks.deid.deidentifier import Deidentifier, Rule, load_profile
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SC = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"

UID_ROOT = "1.2.826.0.1.3680043.9.9999."
REMOVING = frozenset("DXZU")  # actions that never leave the original value
EMPTYING_SEQUENCE = frozenset("DXZ")  # on a sequence: nothing of its items may survive
TEXT_VRS = frozenset({"AE", "CS", "SH", "LO", "ST", "LT", "UT", "UC", "UR"})
LONG_TEXT_VRS = frozenset({"LO", "ST", "LT", "UT", "UC"})
BINARY_VRS = frozenset({"OB", "OW", "UN"})
# Code Sequence macro, as planted in every item: coded concepts, kept inside K and C sequences.
CODE_VALUE, CODING_SCHEME, CODE_MEANING = 0x00080100, 0x00080102, 0x00080104
CODE_TAGS = frozenset({CODE_VALUE, CODING_SCHEME, CODE_MEANING})
TEXT_VALUE, PERSON_NAME, DATE, CONCEPT_NAME, CONCEPT_CODE = 0x0040A160, 0x0040A123, 0x0040A121, 0x0040A043, 0x0040A168
CONTENT_SEQUENCE = 0x0040A730


@dataclass(frozen=True)
class Planted:
    """One original value: where (``path``), what to look for, and whether it must be gone."""

    path: str  # e.g. "(0040,A730)[0].(0008,0100)"
    value: str | bytes
    kind: str  # text | name | date | datetime | time | number | uid | bytes | binary
    must_go: bool
    why: str  # the action (or the enclosing sequence's) that decides


@dataclass
class CorpusObject:
    file: str
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    charset: str | None
    burned_in: bool
    planted: list[Planted] = field(default_factory=list)


def tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def resolve(rule: Rule, options: tuple[str, ...]) -> str:
    """A table row's action under ``options`` (repeating groups and private rows, which the
    de-identifier's public ``action_for`` does not cover): an option's code wins, C over K."""
    chosen = [rule.options[o] for o in options if rule.options.get(o)]
    if not chosen:
        return rule.basic
    return "C" if "C" in chosen else chosen[0]


# Values made from the counter alone, each unique: the VR's format and how the scan matches it.
_NUMBERED: dict[str, tuple[Callable[[int], str], str]] = {
    "TM": (lambda n: f"{8 + n % 12:02d}{n % 60:02d}{(7 * n) % 60:02d}.{n:06d}", "time"),
    "DS": (lambda n: f"7{n:05d}.5", "number"),
    "IS": (lambda n: f"8{n:05d}", "number"),
    "AS": (lambda n: f"{40 + n % 40:03d}Y", "number"),
    "UI": (lambda n: f"{UID_ROOT}{10000 + n}", "uid"),
}
Builder = Callable[[str, str, list[tuple[str, str]]], Dataset]


class _Planter:
    """Fills one object, numbering every value from a corpus-wide counter."""

    def __init__(self, deid: Deidentifier, counter: list[int], obj: CorpusObject, accents: bool) -> None:
        self.deid = deid
        self.counter = counter
        self.obj = obj
        self.accents = accents
        self.year = 1780
        self.types = deid_iod.types_for_sop_class(obj.sop_class_uid)
        self.options = tuple(o.value for o in deid.options)

    # -- values -------------------------------------------------------------------------
    def next(self) -> int:
        self.counter[0] += 1
        return self.counter[0]

    def token(self, tag: int, accented: bool = False) -> str:
        n = self.next()
        return f"ZQ{tag:08X}{'É' if accented else 'N'}{n:05d}"

    def date(self) -> str:
        self.year += 2  # two years apart: no day shift maps one original onto another
        return f"{self.year}0615"

    def value_for(self, tag: int, vr: str) -> tuple[object, list[tuple[str | bytes, str]]]:
        """The value to store and what to search for it (value, kind)."""
        if vr in TEXT_VRS:
            tok = self.token(tag, self.accents and vr in LONG_TEXT_VRS)
            if vr == "UR":
                return f"https://zq.example.org/{tok}", [(tok, "text")]
            return (f"Q7 {tok}" if vr in LONG_TEXT_VRS else tok), [(tok, "text")]
        if vr == "PN":
            n = self.next()
            fam, giv = (f"Zqfàm{n:05d}", f"Zqgïv{n:05d}") if self.accents else (f"Zqfam{n:05d}", f"Zqgiv{n:05d}")
            return f"{fam}^{giv}", [(f"{fam}^{giv}", "name"), (fam, "name"), (giv, "name")]
        if vr == "DA":
            d = self.date()
            return d, [(d, "date")]
        if vr == "DT":
            d, n = self.date(), self.next()
            v = f"{d}101112.{n:06d}"
            return v, [(v, "datetime"), (d, "date")]
        if vr in _NUMBERED:
            fmt, kind = _NUMBERED[vr]
            v = fmt(self.next())
            return v, [(v, kind)]
        if vr in ("US", "SS"):
            n = 1000 + self.next()
            return n, [(struct.pack("<H", n), "binary")]
        if vr in BINARY_VRS:
            raw = f"ZQBIN{self.token(tag)}".encode("ascii")
            return raw + b"\x00" * (len(raw) & 1), [(raw, "bytes")]
        raise ValueError(f"no value for VR {vr} of {tag_text(tag)}")

    # -- actions ------------------------------------------------------------------------
    def action(self, tag: int, path: str) -> str:
        code = self.deid.action_for(tag)
        if len(code) > 1:
            attr_type = self.types.get(f"{path}{tag:08X}") if self.types is not None else None
            return deid_iod.choose(code, attr_type, self.types is not None)
        return code

    def record(self, where: str, found: list[tuple[str | bytes, str]], vr: str, own: str | None,
               outer: list[tuple[str, str]], tag: int) -> None:
        must, why = _must_go(vr, own, outer, tag)
        for value, kind in found:
            self.obj.planted.append(Planted(where, value, kind, must, why))

    # -- building -----------------------------------------------------------------------
    def put(self, ds: Dataset, tag: int, vr: str, where: str, outer: list[tuple[str, str]],
            own: str | None) -> None:
        """Store a new value at ``tag`` and record it; ``own`` is its row's action (None: no row)."""
        value, found = self.value_for(tag, vr)
        ds.add_new(tag, vr, value)
        self.record(where + tag_text(tag), found, vr, own, outer, tag)

    def leaf(self, ds: Dataset, tag: int, where: str, path: str, outer: list[tuple[str, str]]) -> None:
        """A standard attribute inside an item: its own row (if any) applies, then the enclosing ones."""
        own = self.action(tag, path) if tag in load_profile().rules else None
        self.put(ds, tag, _vr(tag), where, outer, own)

    def item(self, where: str, path: str, outer: list[tuple[str, str]]) -> Dataset:
        """A generic item: Code Sequence macro, free text, a person name and a private block."""
        it = self.codes(where, path, outer)
        for t in (TEXT_VALUE, PERSON_NAME):
            self.leaf(it, t, where, path, outer)
        self.private_block(it, 0x0011, where, outer)
        return it

    def codes(self, where: str, path: str, outer: list[tuple[str, str]]) -> Dataset:
        it = Dataset()
        for t in (CODE_VALUE, CODING_SCHEME, CODE_MEANING):
            self.leaf(it, t, where, path, outer)
        return it

    def sequence(self, ds: Dataset, tag: int, where: str, path: str, outer: list[tuple[str, str]],
                 builders: list[Builder] | None = None) -> None:
        """A sequence at ``tag`` whose items the ``builders`` make (one generic item by default)."""
        action = self.action(tag, path) if tag in load_profile().rules else "K"
        inner = outer + [(where + tag_text(tag), action)]
        items = []
        for i, build in enumerate(builders or [self.item]):
            items.append(build(f"{where}{tag_text(tag)}[{i}].", f"{path}{tag:08X}:", inner))
        ds.add_new(tag, "SQ", Sequence(items))

    # -- structured content -----------------------------------------------------------------
    def content_item(self, value_type: str) -> Builder:
        def build(where: str, path: str, outer: list[tuple[str, str]]) -> Dataset:
            it = Dataset()
            it.RelationshipType = "CONTAINS"
            it.ValueType = value_type
            self.sequence(it, CONCEPT_NAME, where, path, outer, [self.codes])
            if value_type == "TEXT":
                self.leaf(it, TEXT_VALUE, where, path, outer)
            elif value_type == "CODE":
                self.sequence(it, CONCEPT_CODE, where, path, outer, [self.codes])
            elif value_type == "PNAME":
                self.leaf(it, PERSON_NAME, where, path, outer)
            elif value_type == "DATE":
                self.leaf(it, DATE, where, path, outer)
            else:
                it.ContinuityOfContent = "SEPARATE"
                self.sequence(it, CONTENT_SEQUENCE, where, path, outer,
                              [self.content_item(v) for v in ("TEXT", "CODE", "PNAME", "DATE")])
            return it

        return build

    def sr_root(self, ds: Dataset) -> None:
        ds.ValueType = "CONTAINER"
        ds.ContinuityOfContent = "SEPARATE"
        ds.CompletionFlag = "COMPLETE"
        ds.VerificationFlag = "UNVERIFIED"
        self.sequence(ds, CONCEPT_NAME, "", "", [], [self.codes])
        self.sequence(ds, CONTENT_SEQUENCE, "", "", [],
                      [self.content_item(v) for v in ("TEXT", "CODE", "PNAME", "DATE", "CONTAINER")])

    def private_block(self, ds: Dataset, group: int, where: str, outer: list[tuple[str, str]]) -> None:
        action = resolve(load_profile().private_rule or Rule("X", {}), self.options)
        inner = outer + [("private", action)]
        creator = self.token(group << 16 | 0x0010)
        ds.add_new(group << 16 | 0x0010, "LO", creator)
        self.record(f"{where}({group:04X},0010)", [(creator, "text")], "LO", action, outer, group << 16)
        for elem, vr in ((0x1001, "LO"), (0x1002, "OB")):
            value, found = self.value_for(group << 16 | elem, vr)
            ds.add_new(group << 16 | elem, vr, value)
            self.record(f"{where}({group:04X},{elem:04X})", found, vr, action, inner, group << 16 | elem)

    def repeating_groups(self, ds: Dataset) -> None:
        profile = load_profile()
        curve = resolve(profile.curve_rule or Rule("X", {}), self.options)
        overlay = resolve(profile.overlay_rules.get(0x3000, Rule("X", {})), self.options)
        ds.add_new(0x50000005, "US", 1)
        ds.add_new(0x50000010, "US", 1)
        for elem, vr in ((0x0020, "CS"), (0x0022, "LO"), (0x0030, "SH"), (0x2500, "LO"), (0x3000, "OB")):
            self.put(ds, 0x50000000 | elem, vr, "", [("(50xx) curve", curve)], curve)
        ds.add_new(0x60000010, "US", 16)
        ds.add_new(0x60000011, "US", 16)
        ds.add_new(0x60000040, "CS", "G")
        ds.add_new(0x60000050, "SS", [1, 1])
        ds.add_new(0x60000100, "US", 1)
        ds.add_new(0x60000102, "US", 0)
        for elem, vr in ((0x0022, "LO"), (0x1500, "LO"), (0x4000, "LT")):
            self.put(ds, 0x60000000 | elem, vr, "", [("(60xx) overlay", overlay)], overlay)
        raw = f"ZQOVL{self.token(0x60003000)}".encode("ascii").ljust(32, b"\x00")[:32]
        ds.add_new(0x60003000, "OW", raw)
        self.record("(6000,3000)", [(raw.rstrip(b"\x00"), "bytes")], "OW", overlay, [], 0x60003000)


def _vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]


def _must_go(vr: str, own: str | None, outer: list[tuple[str, str]], tag: int) -> tuple[bool, str]:
    """Whether the profile leaves nothing of this value, and the action that decides it."""
    for where, action in outer:
        if action in EMPTYING_SEQUENCE:
            return True, f"{action} on {where}"
    if own in REMOVING:
        return True, own
    if own == "C":
        if vr == "TM":
            return False, "C on a time: whole-day shifts keep the time of day"
        if vr in ("DS", "IS", "US", "SS"):
            return False, "C on a number: kept"
        return True, "C"
    cleaning = [w for w, a in outer if a == "C"]
    if cleaning and (tag & 0xFFFFFFFF) not in CODE_TAGS and vr in TEXT_VRS | {"PN"}:
        return True, f"free text in C sequence {cleaning[-1]}"
    return False, f"{own or 'no row'} (kept)"


def table_rows() -> list[tuple[int, str]]:
    """(tag, VR) of every standard, non-repeating row: VR from pydicom's dictionary, else the table's."""
    import json
    from importlib import resources

    from pacsflow.tasks.deid.deidentifier import TABLE_RESOURCE

    with resources.files("pacsflow.tasks.deid").joinpath("data", TABLE_RESOURCE).open("r", encoding="utf-8") as fh:
        table = json.load(fh)
    out = []
    for row in table["attributes"]:
        text = row["tag"].upper()
        if not all(c in "0123456789ABCDEF" for c in text[1:5] + text[6:10]):
            continue  # 50xx, 60xx and private rows are filled as groups
        tag = int(text[1:5] + text[6:10], 16)
        vr = _vr(tag)
        out.append((tag, vr if vr != "UN" else (row["vr"] or "UN").split(" or ")[0]))
    return out


@dataclass(frozen=True)
class _Spec:
    file: str
    sop_class_uid: str
    modality: str
    charset: str | None
    burned_in: str | None  # BurnedInAnnotation, or None when the object has no pixels
    bits: int = 16


SPECS = (
    _Spec("01-ct.dcm", CT, "CT", None, "NO"),
    _Spec("02-mr-utf8.dcm", MR, "MR", "ISO_IR 192", "NO"),
    _Spec("03-sc-latin1.dcm", SC, "OT", "ISO_IR 100", "NO", bits=8),
    _Spec("04-sr.dcm", COMPREHENSIVE_SR, "SR", None, None),
    _Spec("05-us-burned-in.dcm", US_IMAGE, "US", None, "YES", bits=8),
)


def build_corpus(folder: Path, deid: Deidentifier) -> list[CorpusObject]:
    """Write one object per ``SPECS`` entry into ``folder``; what was planted, judged under
    ``deid``'s options (every value unique across the corpus)."""
    folder.mkdir(parents=True, exist_ok=True)
    counter = [0]
    out = []
    for spec in SPECS:
        obj = CorpusObject(spec.file, spec.sop_class_uid, "", "", "", spec.charset, spec.burned_in == "YES")
        ds = _fill(_Planter(deid, counter, obj, accents=spec.charset is not None), spec)
        obj.sop_instance_uid, obj.study_uid, obj.series_uid = (
            str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
        (folder / spec.file).write_bytes(_part10(ds))
        out.append(obj)
    return out


def _fill(planter: _Planter, spec: _Spec) -> Dataset:
    ds = Dataset()
    if spec.charset:
        ds.SpecificCharacterSet = spec.charset
    for tag, vr in table_rows():
        if tag >> 16 == 0x0002:
            continue  # the file meta's Media Storage SOP Instance UID is the SOP Instance UID
        if vr == "SQ":
            sr_content = tag == CONTENT_SEQUENCE and spec.sop_class_uid == COMPREHENSIVE_SR
            if not sr_content:
                planter.sequence(ds, tag, "", "", [])
            continue
        planter.put(ds, tag, vr, "", [], planter.action(tag, ""))
    if spec.sop_class_uid == COMPREHENSIVE_SR:
        planter.sr_root(ds)
    planter.repeating_groups(ds)
    planter.private_block(ds, 0x0009, "", [])
    ds.SOPClassUID = spec.sop_class_uid
    ds.Modality = spec.modality
    if spec.burned_in is not None:
        _pixels(ds, spec)
    return ds


def _pixels(ds: Dataset, spec: _Spec) -> None:
    ds.BurnedInAnnotation = spec.burned_in
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = spec.bits
    ds.HighBit = spec.bits - 1
    ds.PixelRepresentation = 0
    frame = (np.arange(256).reshape(16, 16) % 200).astype(np.uint16 if spec.bits == 16 else np.uint8)
    ds.PixelData = frame.tobytes()


def _part10(ds: Dataset) -> bytes:
    """Part 10 bytes written element by element: ``dcmwrite`` refuses the command-group rows
    (0000,1000) and (0000,1001) of the table, which a careless sender can still put in an object."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, ds)
    return fp.getvalue()
