"""De-identification: DICOM PS3.15 Annex E Table E.1-1, applied by a pure function.

The table is data (``tasks/deid/data/ps3.15-table-e1-1-2024b.json``, copied from the standard's
edition named in it), never hand-typed rules. The recipe is the table's Basic Profile column
with the option columns selected in settings; everything below is how each action code is
carried out (the conformance statement of this recipe, ``RECIPE_VERSION``):

- **Options** override the Basic Profile. When two selected options both name an attribute
  (e.g. Retain Device Identity K and Retain Long. Modified Dates C on a calibration date),
  C (clean) wins over K.
- **Combined codes** (Z/D, X/Z, X/D, X/Z/D, X/Z/U*) choose by the attribute's Type in the
  object's IOD at that sequence path (:mod:`.iod`; Type 1 -> D or U, 2 -> Z, 3 or not
  in the IOD -> X; an unknown IOD takes D over Z over X, never keeping the original value).
- **D** writes a dummy of the VR, as many values as the original held: ``ANONYMIZED`` for
  text and CS, ``urn:anonymized`` for UR, ``000Y`` for AS, ``19000101`` / ``000000`` /
  ``19000101000000`` for DA / TM / DT, 0 for numbers (IS DS US SS UL SL UV SV FL FD AT), zeros of
  the original length for binary VRs; UIDs are remapped (see U).
- **Sequences.** What the action on a sequence does to its items, at any depth:

  - **D** (Person Identification Code Sequence, Content Sequence, Graphic Annotation Sequence,
    Flow Identifier Sequence, ...): the items and their tags are kept and *every* value in them
    becomes a D dummy -- coded concepts (Code Value, Code Meaning, Coding Scheme ...), numbers,
    dates and free CS values included, since an identification code is the identifier itself.
    Only attributes whose value is one of a closed set the standard enumerates (Value Type,
    Relationship Type, Continuity of Content, Graphic Type, the annotation units) keep a value of
    that set, so the items stay valid content items and graphics; any other value is dummied.
    UIDs get the keyed pseudonym used everywhere (references still resolve; under Retain UIDs they
    are kept, as everywhere). Empty values stay empty. The stricter of D and the table's own rule
    for a nested attribute wins: X removes it and Z empties it (combined codes are resolved by
    the IOD first); K, C and U give way to D (a kept device serial or a cleaned description inside
    a D item is dummied, a date is the dummy date, not a shifted one). Private elements (even
    safe ones), group lengths and repeating groups inside are removed.
  - **X** removes the sequence, **Z** leaves it empty: nothing nested survives.
  - **K** and **U** walk the items with the table's rules; **C** walks them cleaning free text
    (below). Under K and C the coded concepts (Code Sequence macro) stay as they are.
- **Z** writes an empty value. **X** removes. **K** keeps. **U** replaces every UID with a
  ``2.25.`` UID from HMAC-SHA256 under the key, so references stay consistent across instances,
  studies and runs.
- **C** on DA/DT shifts by the patient's day shift (Modified Dates), TM keeps the time of day
  (whole-day shifts). C on text is carried out after the walk, once every person name of the
  object has been noted: :mod:`.descriptors` removes the object's own identifying values (names
  and their components, IDs, accession, addresses, birth date, institution...), names after
  titles, dates and ID-like tokens. C on a sequence cleans every text value and date of its
  items and keeps coded concepts and numbers; on structured content (Clean Structured Content)
  it also removes PNAME content items, at every depth; C on Graphic Annotation (Clean Graphics)
  cleans the text objects and keeps the graphics; C on overlays clears the overlay bitmap and
  cleans its text; C on curves keeps numeric curve values and cleans their text.
- **Retain Patient Characteristics** keeps PatientAge capped at ``090Y`` (Safe Harbor), and
  computes it from the birth date when it is missing (:mod:`.ages`).
- **Overlays (60xx)** and **curves (50xx)** with X are removed as whole groups (an overlay
  without its data is not a valid Overlay Plane module).
- **Private attributes** are removed at every depth; with Retain Safe Private only those on
  ``tasks/deid/data/safe-private-attributes.json`` (PS3.15 Table E.3.10-1) with a VR that carries no
  free text are kept (never inside a D sequence), with their private creator; every other element
  of a safe block goes.
- **Attributes the table does not list** are kept, except by VR: a PN anywhere outside a D
  sequence is treated as D and a DA/DT as C (shifted, kept under Full Dates, emptied without a
  date option), because a name or a date identifies whatever its tag (e.g. Secondary Reviewer
  Name, Study Update DateTime, added to the standard after the table). Command-group (0000,eeee)
  elements never belong in a stored object and are removed.
- **File meta** is replaced by a description of this application (E.1.1 step 7), with the
  preamble zeroed; group-length elements are dropped.

Pseudonyms and UIDs come from HMAC-SHA256 under the secret key, so they are the same on
every run and for every study of a patient, and cannot be recomputed without the key.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Iterable, TypeVar

from pydicom.charset import encode_string
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_sequence
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from pacsflow.tasks.core.errors import DeidentificationError
from pacsflow.tasks.core.values import items_of
from pacsflow.tasks.deid import ages, descriptors
from pacsflow.tasks.deid import iod as deid_iod
from pacsflow.tasks.deid.choices import DEFAULT_OPTIONS, Option, PixelPolicy, conflicting_dates
from pacsflow.tasks.deid.ocr import OcrConfig
from pacsflow.tasks.deid.pixels import MaskRule, check_pixels, parse_masks
from pacsflow.tasks.deid.recipe import SiteRecipe, load_recipe

if TYPE_CHECKING:
    from pacsflow.tasks.settings import DeidSettings

TABLE_RESOURCE = "ps3.15-table-e1-1-2024b.json"
SAFE_PRIVATE_RESOURCE = "safe-private-attributes.json"
# 3: descriptors cleaned after the walk, ages capped. 4: D on a sequence dummies every value of
# its items (coded concepts and numbers too), nested X/Z still apply; codes stay only under K/C;
# unlisted names and dates follow their VR; command-group elements removed.
RECIPE_VERSION = "pacsflow-deid-4"
DEID_METHOD_CODE = "113100"  # Basic Application Confidentiality Profile (CID 7050)
CLEAN_PIXEL_CODE = ("113101", "Clean Pixel Data Option")
IMPLEMENTATION_VERSION_NAME = "PACSFLOW_DEID2"
# Entries of each per-process memo (original -> pseudonymous UID, shifted date strings): a study's
# UIDs repeat within that study, so a few studies' worth is enough; beyond it the memo starts over
# (a worker sees every object of a night: a larger cap is memory kept for nothing).
CACHE_ENTRIES = 20_000


# CID 7050 codes recorded in DeidentificationMethodCodeSequence.
OPTION_CODES = {
    Option.RETAIN_SAFE_PRIVATE: ("113111", "Retain Safe Private Option"),
    Option.RETAIN_UIDS: ("113110", "Retain UIDs Option"),
    Option.RETAIN_DEVICE_IDENTITY: ("113109", "Retain Device Identity Option"),
    Option.RETAIN_INSTITUTION_IDENTITY: ("113112", "Retain Institution Identity Option"),
    Option.RETAIN_PATIENT_CHARACTERISTICS: ("113108", "Retain Patient Characteristics Option"),
    Option.RETAIN_FULL_DATES: ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    Option.RETAIN_MODIFIED_DATES: ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    Option.CLEAN_DESCRIPTORS: ("113105", "Clean Descriptors Option"),
    Option.CLEAN_STRUCTURED_CONTENT: ("113104", "Clean Structured Content Option"),
    Option.CLEAN_GRAPHICS: ("113103", "Clean Graphics Option"),
}

_CLEANING_OPTIONS = frozenset({Option.CLEAN_DESCRIPTORS, Option.CLEAN_STRUCTURED_CONTENT, Option.CLEAN_GRAPHICS})
_DUMMY_TEXT = "ANONYMIZED"
_DUMMY_BY_VR: dict[str, object] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "IS": "0",
    "DS": "0",
    "CS": _DUMMY_TEXT,
    "AE": _DUMMY_TEXT,
    "SH": _DUMMY_TEXT,
    "UR": "urn:anonymized",
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "UV": 0,
    "SV": 0,
    "FL": 0.0,
    "FD": 0.0,
    "AT": 0,
}
_MAX_DAY_SHIFT = 365  # days; dates move back by 1..365 days per patient

_TEXT_VRS = frozenset({"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"})
_DATE_VRS = frozenset({"DA", "DT", "TM"})
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_RAW_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                           "UI", "UR", "UT"})
_NUMERIC_BINARY_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})

# Code Sequence macro attributes: coded concepts are kept inside cleaned (C) sequences, never
# inside dummied (D) ones.
_CODE_TAGS = frozenset(
    {0x00080100, 0x00080102, 0x00080103, 0x00080104, 0x00080105, 0x00080106, 0x00080107, 0x0008010B,
     0x0008010D, 0x0008010F, 0x00080117, 0x00080118, 0x00080119, 0x00080120, 0x00080122, 0x00080121,
     0x0040A040, 0x0040A010, 0x0040A050, 0x00700002, 0x00700023, 0x00700005}
)
# Attributes whose values come from a closed set the standard enumerates: a dummy would make the
# item invalid (an SR reader needs its ValueType) and the value cannot carry anything else, so
# they stay inside D sequences when, and only when, the value is one of the set.
_ENUMERATED: dict[int, frozenset[str]] = {
    0x0040A040: frozenset({"TEXT", "NUM", "CODE", "DATETIME", "DATE", "TIME", "UIDREF", "PNAME", "COMPOSITE",
                           "IMAGE", "WAVEFORM", "SCOORD", "SCOORD3D", "TCOORD", "CONTAINER", "TABLE"}),  # ValueType
    0x0040A010: frozenset({"CONTAINS", "HAS PROPERTIES", "HAS OBS CONTEXT", "HAS ACQ CONTEXT", "INFERRED FROM",
                           "SELECTED FROM", "HAS CONCEPT MOD"}),  # RelationshipType
    0x0040A050: frozenset({"SEPARATE", "CONTINUOUS"}),  # ContinuityOfContent
    0x00700023: frozenset({"POINT", "POLYLINE", "INTERPOLATED", "CIRCLE", "ELLIPSE"}),  # GraphicType
    0x00700003: frozenset({"PIXEL", "DISPLAY", "MATRIX"}),  # BoundingBoxAnnotationUnits
    0x00700004: frozenset({"PIXEL", "DISPLAY", "MATRIX"}),  # AnchorPointAnnotationUnits
    0x00700005: frozenset({"PIXEL", "DISPLAY", "MATRIX"}),  # GraphicAnnotationUnits
}
# Sequences whose items are content items (ValueType): cleaned as structured content.
_VALUE_TYPE = BaseTag(0x0040A040)
_TEXT_VALUE = BaseTag(0x0040A160)

# The identifiers we replace by keyed pseudonyms rather than the table's empty value:
# analysts need a stable per-patient key.
_PATIENT_ID = Tag(0x0010, 0x0020)
_PATIENT_NAME = Tag(0x0010, 0x0010)
_SOP_CLASS_UID = BaseTag(0x00080016)
_SOP_INSTANCE_UID = BaseTag(0x00080018)
_SPECIFIC_CHARACTER_SET = BaseTag(0x00080005)
_METHOD_CODES = BaseTag(0x00120064)  # DeidentificationMethodCodeSequence
_PATIENT_AGE = BaseTag(0x00101010)
_BIRTH_DATE = BaseTag(0x00100030)
_AGE_DATES = (BaseTag(0x00080020), BaseTag(0x00080021), BaseTag(0x00080022), BaseTag(0x00080023))  # study..content

# Identifying attributes whose original values the residual-PHI audit and the "clean" action
# look for (keyword, split into name components). PN values found anywhere are added as well.
IDENTIFYING_KEYWORDS: dict[BaseTag, str] = {BaseTag(tag): keyword for tag, keyword in {
    0x00100010: "PatientName", 0x00100020: "PatientID", 0x00101000: "OtherPatientIDs",
    0x00101001: "OtherPatientNames", 0x00101005: "PatientBirthName", 0x00101060: "PatientMotherBirthName",
    0x00101040: "PatientAddress", 0x00102154: "PatientTelephoneNumbers", 0x00100030: "PatientBirthDate",
    0x00080050: "AccessionNumber", 0x00380010: "AdmissionID", 0x00401001: "RequestedProcedureID",
    0x00100050: "PatientInsurancePlanCodeSequence", 0x00101090: "MedicalRecordLocator",
    0x00080090: "ReferringPhysicianName", 0x00081050: "PerformingPhysicianName",
    0x00081060: "NameOfPhysiciansReadingStudy", 0x00081070: "OperatorsName",
    0x00080080: "InstitutionName", 0x00080081: "InstitutionAddress", 0x00081040: "InstitutionalDepartmentName",
    0x00181000: "DeviceSerialNumber", 0x00200010: "StudyID", 0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID", 0x00080018: "SOPInstanceUID", 0x00200052: "FrameOfReferenceUID",
}.items()}
_NAME_COMPONENTS = re.compile(r"[\^=\\ ,]+")
_NAME_COMPONENTS_BYTES = re.compile(rb"[\^=\\]+")


@dataclass(frozen=True)
class Rule:
    basic: str
    options: dict[str, str]


@dataclass(frozen=True)
class Profile:
    edition: str
    rules: dict[int, Rule]
    overlay_rules: dict[int, Rule]  # element number within a 60xx group
    curve_rule: Rule | None
    private_rule: Rule | None


@cache
def load_profile() -> Profile:
    with resources.files("pacsflow.tasks.deid").joinpath("data", TABLE_RESOURCE).open("r", encoding="utf-8") as fh:
        table = json.load(fh)
    rules: dict[int, Rule] = {}
    overlay: dict[int, Rule] = {}
    curve = private = None
    for row in table["attributes"]:
        rule = Rule(row["basic"], dict(row.get("options") or {}))
        tag = row["tag"].upper()
        if tag.startswith("(GGGG"):
            private = rule
        elif tag.startswith("(50XX"):
            curve = rule
        elif tag.startswith("(60XX"):
            overlay[int(tag[6:10], 16)] = rule
        else:
            rules[int(tag[1:5] + tag[6:10], 16)] = rule
    return Profile(table["edition"], rules, overlay, curve, private)


@cache
def load_safe_private() -> dict[tuple[int, str, int], str]:
    """(group, private creator, element offset) -> VR, from Table E.3.10-1."""
    with resources.files("pacsflow.tasks.deid").joinpath("data", SAFE_PRIVATE_RESOURCE).open("r", encoding="utf-8") as fh:
        table = json.load(fh)
    return {
        (int(r["group"], 16), r["creator"].strip().upper(), int(r["element"], 16)): r["vr"]
        for r in table["attributes"]
    }


def _hmac(key: bytes, domain: str, value: str) -> bytes:
    return hmac.new(key, f"{domain}\x00{value}".encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


def pseudonymize_uid(key: bytes, uid: str) -> str:
    """A ``2.25.`` UID from 128 bits of HMAC: deterministic, collision-free in practice, <= 64 chars."""
    return "2.25." + str(int.from_bytes(_hmac(key, "uid", uid.strip("\x00 "))[:16], "big"))


def patient_pseudonym(key: bytes, patient_id: str) -> str:
    return "PF" + _hmac(key, "patient", patient_id.strip()).hex()[:20].upper()


def patient_day_shift(key: bytes, patient_id: str) -> int:
    """Days to move this patient's dates back: the same for all of a patient's studies, every run."""
    return -(1 + int.from_bytes(_hmac(key, "dateshift", patient_id.strip())[:4], "big") % _MAX_DAY_SHIFT)


@dataclass
class DeidReport:
    actions: dict[str, int] = field(default_factory=dict)

    def count(self, action: str, n: int = 1) -> None:
        self.actions[action] = self.actions.get(action, 0) + n

    def merge(self, other: "DeidReport") -> None:
        for k, v in other.actions.items():
            self.count(k, v)


@dataclass
class Originals:
    """The original identifying values of one object, collected while it is de-identified.

    Held in memory only, for the residual-PHI audit of the encoded output; never logged.
    ``values`` maps an attribute keyword to its original (decoded) strings and raw bytes.
    """

    encodings: list[str] = field(default_factory=lambda: ["iso8859"])
    values: dict[str, list[str | bytes]] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)  # PN-like keywords: searched by component too
    # For the audit to tell a retained, unchanged element from one the walk wrote: the plan's
    # action per standard tag, and every walked dataset's elements as they were before the walk
    # (by id; the dataset is held so that its id cannot be reused by a new one).
    actions: Mapping[int, str] = field(default_factory=dict)
    snapshots: dict[int, tuple[Dataset, dict[BaseTag, Any]]] = field(default_factory=dict)
    _tokens: dict[str, set[str | bytes]] | None = field(default=None, repr=False, compare=False)

    def keep(self, ds: Dataset) -> None:
        """Snapshot ``ds``'s elements: a shallow copy, which is enough because the walk replaces
        elements (``_set``), never edits a value in place, and raw elements are immutable."""
        if id(ds) not in self.snapshots:
            self.snapshots[id(ds)] = (ds, dict(ds._dict))

    def add(self, keyword: str, value: str | bytes, is_name: bool = False) -> None:
        if value:
            self.values.setdefault(keyword, []).append(value)
            self._tokens = None
            if is_name:
                self.names.add(keyword)

    def tokens(self) -> dict[str, set[str | bytes]]:
        """Keyword -> search tokens (whole values, and name components), long enough to be specific.

        Name components need 5 characters (4 if non-ASCII): shorter ones ("Test", "Mark") are
        also code values and common words, and the whole name is searched anyway. Computed once
        for the cleaning and the audit (read it, do not change it)."""
        if self._tokens is None:
            self._tokens = self._make_tokens()
        return self._tokens

    def _make_tokens(self) -> dict[str, set[str | bytes]]:
        out: dict[str, set[str | bytes]] = {}
        for kw, vals in self.values.items():
            toks: set[str | bytes] = set()
            for v in vals:
                whole: str | bytes
                if isinstance(v, bytes):
                    whole = v.strip(b"\x00 ")
                    # ISO 2022 multi-byte text uses "^" inside characters: never split it as bytes
                    parts = _NAME_COMPONENTS_BYTES.split(v) if kw in self.names and b"\x1b" not in v else []
                    toks.update([whole] if _specific(whole, kw) else [])
                    toks.update(p.strip(b" ") for p in parts if _specific(p.strip(b" "), kw, True))
                else:
                    whole = v.strip()
                    parts = _NAME_COMPONENTS.split(v) if kw in self.names else []
                    toks.update([whole] if _specific(whole, kw) else [])
                    toks.update(p.strip() for p in parts if _specific(p.strip(), kw, True))
            if toks:
                out[kw] = toks
        return out

    def short_name_parts(self) -> set[str]:
        """Name components too short for the audit (3-4 letters, e.g. "Lee"): cleaning removes
        them from descriptors as whole words all the same."""
        out: set[str] = set()
        for kw in self.names:
            for v in self.values.get(kw, ()):
                text = v.decode("latin-1") if isinstance(v, bytes) else v
                out.update(p for p in _NAME_COMPONENTS.split(text) if len(p) >= 3 and not p.isdigit())
        return out


# Free-text identifiers (institution, address): short values are common words ("Here", "Main").
_LONG_ONLY = frozenset({"InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "PatientAddress"})


def _specific(token: str | bytes, keyword: str = "", component: bool = False) -> bool:
    minimum = 6 if keyword in _LONG_ONLY else 4
    if component:
        ascii_only = all(c < 128 for c in (token if isinstance(token, bytes) else token.encode("utf-8")))
        minimum = 5 if ascii_only else 2  # CJK given and family names are often 2-3 characters
    if len(token) < minimum:
        return False
    if token.isdigit() and len(token) < 6:
        return False
    low = token.lower() if isinstance(token, str) else token.decode("latin-1").lower()
    return low not in ("anonymized", "unknown", "none", "null", "2.25")


class _Plan:
    """The action of every table row for one option set, resolved once."""

    def __init__(self, profile: Profile, options: tuple[Option, ...]) -> None:
        def resolve(rule: Rule) -> str:
            chosen = [rule.options[o.value] for o in options if rule.options.get(o.value)]
            if not chosen:
                return rule.basic
            return "C" if "C" in chosen else chosen[0]

        self.actions: dict[int, str] = {t: resolve(r) for t, r in profile.rules.items()}
        self.overlay: dict[int, str] = {e: resolve(r) for e, r in profile.overlay_rules.items()}
        self.curve = resolve(profile.curve_rule) if profile.curve_rule else "X"
        self.private = resolve(profile.private_rule) if profile.private_rule else "X"


class _Mode(enum.IntEnum):
    NORMAL = 0
    DUMMY = 1  # inside a sequence whose action is D
    CLEAN = 2  # inside a sequence whose action is C


@dataclass
class _Ctx:
    report: DeidReport
    shift: int
    types: dict[str, str] | None
    originals: Originals
    # Text to clean once the whole object has been walked, so that every name noted on the way
    # (a performing physician after the study description) is removed from every descriptor.
    pending: list[tuple[Dataset, BaseTag, str]] = field(default_factory=list)


@cache
def _dict_vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]


def _vr_of(elem: Any, tag: int) -> str:
    vr = elem.VR
    if vr is None or (vr == "UN" and not (tag >> 16) & 1):
        return _dict_vr(tag)  # implicit VR, or UN for a standard tag
    if " or " in vr:
        return vr.split(" or ")[0]
    return vr


def _str_values(elem: Any) -> list[str]:
    value = elem.value
    if value is None:
        return []
    if isinstance(value, bytes):
        text = value.decode("ascii", "replace").strip("\x00 ")
        return [v.strip("\x00 ") for v in text.split("\\")] if text else []
    if isinstance(value, str):
        return [value] if value else []
    try:
        return [str(v) for v in value]
    except TypeError:
        return [str(value)]


def _texts(ds: Dataset, elem: Any, vr: str) -> list[Any]:
    """An element's values as text without converting it in the Dataset: ASCII raw values as
    ``bytes`` (identical in every ASCII-compatible character set), others decoded to ``str``
    (plus their raw bytes, as found in the file)."""
    if isinstance(elem, RawDataElement):
        raw = elem.value
        if not raw:
            return []
        raw = bytes(raw)
        if raw.isascii() and b"\x1b" not in raw:
            text = raw.strip(b"\x00 ")
            return [v.strip(b"\x00 ") for v in text.split(b"\\") if v.strip(b"\x00 ")] if vr != "PN" else [text]
        from pydicom.dataelem import convert_raw_data_element

        try:
            value = convert_raw_data_element(elem, encoding=ds._character_set, ds=ds).value
        except (ValueError, TypeError, LookupError):
            return [raw]
        out: list[Any] = [raw]
    else:
        value = elem.value
        out = []
    if value is None or value == "":
        return out
    out += [str(v) for v in items_of(value) if v is not None and str(v)]
    return out


def _first_text(ds: Dataset, tag: BaseTag, vr: str = "LO") -> str:
    """The first value of a top-level element as text, without converting it in the Dataset."""
    elem = ds._dict.get(tag)
    if elem is None:
        return ""
    values = _texts(ds, elem, vr)
    decoded = [v for v in values if isinstance(v, str)]
    if decoded:
        return decoded[0]
    return values[0].decode("ascii", "replace") if values else ""


def _patient_id(ds: Dataset) -> str:
    return _first_text(ds, _PATIENT_ID)


def _patient_age(ds: Dataset) -> str | None:
    """The PatientAge to write (Retain Patient Characteristics): the stored one capped at 90,
    else one computed from the birth date and the first date of the study found."""
    stored = _first_text(ds, _PATIENT_AGE, "AS")
    if stored.strip():
        return ages.capped(stored)
    birth = _first_text(ds, _BIRTH_DATE, "DA")
    on = next((v for v in (_first_text(ds, t, "DA") for t in _AGE_DATES) if v.strip()), "")
    return ages.computed(birth, on) if birth and on else None


class Deidentifier:
    """Applies the profile to Datasets in place. Holds the key; never logs values.

    ``options`` and ``pixel_policy`` take the enums of :mod:`.choices` or their values (the CLI
    passes strings). A ``pixel_policy`` (with ``pixel_masks``) turns on the burned-in annotation
    check before the header is touched; ``audit`` makes ``apply`` hand back the original
    identifying values for :func:`pacsflow.tasks.deid.instance.encode` to audit the output with.
    """

    def __init__(
        self,
        key: bytes,
        options: Iterable[Option | str] = DEFAULT_OPTIONS,
        *,
        pixel_policy: PixelPolicy | str | None = None,
        pixel_masks: Iterable[MaskRule | dict[str, Any]] = (),
        audit: bool = True,
        recipe: SiteRecipe | None = None,
        pixel_ocr: OcrConfig | None = None,
    ) -> None:
        if not key:
            raise DeidentificationError("an empty de-identification key is not allowed; check deid_key, deid_key_file "
                                        "or deid_key_block")
        self._key = key
        chosen = {_member(Option, o, "de-identification option (deid.options)") for o in options}
        self.options = tuple(sorted(chosen, key=lambda o: o.value))
        if conflicting_dates(self.options):
            raise DeidentificationError("choose one of the full-dates and modified-dates options (deid.options)")
        self.profile = load_profile()
        self._plan = _plan_for(self.options)
        self._uid_cache: dict[str, str] = {}
        self._codes_raw: dict[tuple[bool, bool], bytes] = {}
        self._retain_uids = Option.RETAIN_UIDS in self.options
        self._safe_private = load_safe_private() if self._plan.private == "C" else {}
        self._cleans = bool(_CLEANING_OPTIONS.intersection(self.options))
        self.audit = audit
        self.pixel_policy = _member(PixelPolicy, pixel_policy, "pixel policy (deid.pixel_policy)") if pixel_policy is not None else None
        self.pixel_masks: tuple[MaskRule, ...] = tuple(parse_masks(pixel_masks)) if pixel_policy is not None else ()
        self.recipe = recipe  # a site's deid recipe, applied on top of the profile (see .recipe)
        # its %filter regions join the pixel policy's (deid's own object, built once per process)
        self._site_filters = recipe.deid_recipe() if recipe is not None and recipe.filters() else None
        self.pixel_ocr = pixel_ocr or OcrConfig()

    def __reduce__(self):
        # Rebuilt from its inputs in worker processes: the plan and tables are cached per process.
        return (
            _rebuild,
            (self._key, tuple(o.value for o in self.options),
             self.pixel_policy.value if self.pixel_policy is not None else None, self.pixel_masks, self.audit,
             self.recipe, self.pixel_ocr),
        )

    @classmethod
    def from_settings(cls, key: bytes, settings: DeidSettings) -> "Deidentifier":
        """Build from the ``deid`` section of the settings."""
        return cls(
            key,
            settings.options,
            pixel_policy=settings.pixel_policy,
            pixel_masks=settings.pixel_masks,
            audit=settings.audit,
            recipe=load_recipe(settings.recipe_file, settings.recipe_may_keep) if settings.recipe_file else None,
            pixel_ocr=OcrConfig.from_settings(settings),
        )

    # -- identifiers -----------------------------------------------------------------
    def uid(self, uid: str) -> str:
        if self._retain_uids:
            return uid
        new = self._uid_cache.get(uid)
        if new is None:
            if len(self._uid_cache) >= CACHE_ENTRIES:
                self._uid_cache.clear()
            new = self._uid_cache[uid] = pseudonymize_uid(self._key, uid)
        return new

    def study_ref(self, original: str) -> str:
        """The name of a study in logs, run names, paths and artifacts: always the keyed
        ``2.25.`` pseudonym, even under Retain UIDs, so no original UID is shown."""
        return pseudonymize_uid(self._key, original)

    def patient_ref(self, patient_id: str) -> str:
        return patient_pseudonym(self._key, patient_id)

    def date_as_deidentified(self, date: str, patient_id: str | None) -> str:
        """A DA value (e.g. a StudyDate) as the lake holds it after :meth:`apply`: kept, shifted by
        the patient's days, or "" when dates are removed (or the patient is unknown)."""
        if Option.RETAIN_FULL_DATES in self.options:
            return date
        if Option.RETAIN_MODIFIED_DATES not in self.options or patient_id is None or len(date) < 8:
            return ""
        return _shift_one(date[:8], patient_day_shift(self._key, patient_id.strip())) or ""

    def method_description(self) -> str:
        names = ["Basic Application Confidentiality Profile"] + [o.value for o in self.options]
        return f"PS3.15 E.1-1 {self.profile.edition}; {RECIPE_VERSION}; " + "; ".join(names)

    def method_values(self) -> list[str]:
        """DeidentificationMethod (LO, VM 1-n): one value per part, each <= 64 characters."""
        return [f"DICOM PS3.15 E.1-1 {self.profile.edition}", RECIPE_VERSION, "Basic Profile"] + [
            o.value for o in self.options
        ] + (self.recipe.method_values() if self.recipe is not None else [])

    def method_codes(self, pixels_cleaned: bool = False) -> list[tuple[str, str]]:
        codes = [(DEID_METHOD_CODE, "Basic Application Confidentiality Profile")]
        if pixels_cleaned:
            codes.append(CLEAN_PIXEL_CODE)
        return codes + [OPTION_CODES[o] for o in self.options]

    def action_for(self, tag: int) -> str:
        """The plan's action for a standard tag (after options; combined codes unresolved)."""
        return self._plan.actions.get(int(tag), "K")

    # -- the walk ----------------------------------------------------------------------
    def apply(self, ds: Dataset, report: DeidReport | None = None) -> Originals | None:
        """De-identify ``ds`` in place: pixel policy, profile, patient pseudonym, method
        attributes, file meta. Returns the original identifying values for the residual-PHI
        audit of the encoded output (in memory only; ``None`` when this de-identifier does not
        audit)."""
        report = report if report is not None else DeidReport()
        pixels_cleaned = False
        if self.pixel_policy is not None:
            pixels_cleaned = check_pixels(ds, self.pixel_policy, self.pixel_masks, report, self.pixel_ocr,
                                          self._site_filters)
        site = self.recipe.before_profile(ds, self.action_for, report) if self.recipe is not None else None
        original_pid = _patient_id(ds)
        shift = patient_day_shift(self._key, original_pid)
        sop_class = _str_values(ds._dict[_SOP_CLASS_UID]) if _SOP_CLASS_UID in ds._dict else []
        types = deid_iod.types_for_sop_class(sop_class[0]) if sop_class else None
        originals = self._collect(ds)
        age = _patient_age(ds) if Option.RETAIN_PATIENT_CHARACTERISTICS in self.options else None
        ctx = _Ctx(report, shift, types, originals)
        self._walk(ds, ctx, "", _Mode.NORMAL, top=True)
        self._clean_pending(ctx)
        if Option.RETAIN_PATIENT_CHARACTERISTICS in self.options:
            self._write_age(ds, age)
        if site is not None:
            site.after_profile(ds, report)  # the site recipe only tightens (KEEP: see .recipe)
        self._replace_file_meta(ds)
        pseudonym = patient_pseudonym(self._key, original_pid)
        ds.PatientID = pseudonym
        ds.PatientName = pseudonym
        report.count("D", 2)
        self._record_method(ds, pixels_cleaned)
        return originals if self.audit else None

    def _write_age(self, ds: Dataset, age: str | None) -> None:
        if age is not None:
            self._set(ds._dict, _PATIENT_AGE, "AS", age)
        elif _PATIENT_AGE in ds._dict:
            del ds._dict[_PATIENT_AGE]  # malformed: AS could carry free text

    def _record_method(self, ds: Dataset, pixels_cleaned: bool) -> None:
        """The attributes that say how the object was de-identified (PS3.15 E.1.1 step 6)."""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = self.method_values()
        implicit, little = ds.original_encoding
        if little is True and implicit is not None:
            # the same items in every object: encoded once, kept raw (the writer copies them)
            raw = self._method_codes_raw(pixels_cleaned, bool(implicit))
            ds._dict[_METHOD_CODES] = RawDataElement(_METHOD_CODES, None if implicit else "SQ", len(raw), raw, 0,
                                                     bool(implicit), True, True, False)
        else:
            ds.DeidentificationMethodCodeSequence = self._method_code_items(pixels_cleaned)
        if Option.RETAIN_MODIFIED_DATES in self.options:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        elif Option.RETAIN_FULL_DATES in self.options:
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        else:
            ds.LongitudinalTemporalInformationModified = "REMOVED"  # dates emptied or removed

    def _method_code_items(self, pixels_cleaned: bool) -> Sequence:
        codes = Sequence()
        for value, meaning in self.method_codes(pixels_cleaned):
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            codes.append(item)
        return codes

    def _method_codes_raw(self, pixels_cleaned: bool, implicit: bool) -> bytes:
        """DeidentificationMethodCodeSequence's value as pydicom writes it (defined lengths)."""
        key = (pixels_cleaned, implicit)
        raw = self._codes_raw.get(key)
        if raw is None:
            fp = DicomBytesIO()
            fp.is_implicit_VR, fp.is_little_endian = implicit, True
            write_sequence(fp, DataElement(_METHOD_CODES, "SQ", self._method_code_items(pixels_cleaned)), ["iso8859"])
            raw = self._codes_raw[key] = fp.getvalue()
        return raw

    def _collect(self, ds: Dataset) -> Originals:
        """Original identifying values of the top level, before anything changes.

        Raw elements are read without converting them in the Dataset (an element left raw is
        written back as its original bytes, which is what keeps retained text correctly encoded
        and the writer fast); only non-ASCII values are decoded, with the object's character set."""
        encodings = ds._character_set if _SPECIFIC_CHARACTER_SET in ds._dict else ["iso8859"]
        originals = Originals(list(encodings), actions=self._plan.actions)
        d = ds._dict
        actions = self._plan.actions
        for tag, keyword in IDENTIFYING_KEYWORDS.items():
            elem = d.get(tag)
            if elem is None or actions.get(tag, "K") == "K" and tag not in (0x00100010, 0x00100020):
                continue
            vr = _vr_of(elem, tag)
            if vr == "UI" and self._retain_uids or vr == "SQ":
                continue
            for v in _texts(ds, elem, vr):
                originals.add(keyword, v, vr == "PN")
        return originals

    def _walk(self, ds: Dataset, ctx: _Ctx, path: str, mode: _Mode, top: bool = False) -> None:
        if self.audit:
            ctx.originals.keep(ds)
        d = ds._dict
        actions = self._plan.actions
        report = ctx.report
        has_private = False
        for tag in list(d):
            t = int(tag)
            g = t >> 16
            if g & 1:
                has_private = True
                continue
            if not g:  # the command group of a DIMSE message never belongs in a stored object
                del d[tag]
                report.count("X")
                continue
            if top and (t == _PATIENT_ID or t == _PATIENT_NAME):
                continue
            act = actions.get(t)
            if act is None:
                if 0x5000 <= g <= 0x60FF and (g & 0xFF00) in (0x5000, 0x6000):
                    self._repeating_group(ds, tag, g, ctx)
                    continue
                if t & 0xFFFF == 0:  # group length: wrong after any change, retired anyway
                    del d[tag]
                    continue
                elem = d[tag]
                vr = _vr_of(elem, t)
                if vr == "SQ":
                    self._walk_items(ds, tag, ctx, path, mode)
                elif not mode:
                    if vr == "PN" or vr == "DA" or vr == "DT":
                        self._unlisted(ds, tag, vr, ctx)
                elif t not in _CODE_TAGS:  # CLEAN: coded concepts stay, text is cleaned
                    if vr in _TEXT_VRS:
                        if vr == "PN":
                            self._note_name(ds, tag, ctx)
                        self._clean_text(ds, tag, vr, ctx)
                        report.count("C")
                    elif vr == "DA" or vr == "DT":
                        self._date(d, tag, vr, ctx, "C")
                continue
            if len(act) > 1:
                act = self._choose(act, ctx, path, t)
            self._do(ds, tag, t, act, ctx, path, mode)
        if has_private:
            self._private(ds, ctx)

    def _unlisted(self, ds: Dataset, tag: BaseTag, vr: str, ctx: _Ctx) -> None:
        """An attribute Table E.1-1 does not list is kept, except what its VR says is a person
        or a date (e.g. Secondary Reviewer Name, Study Update DateTime): the table cannot list
        every attribute a later edition adds, and a name or date is identifying whatever its tag."""
        if vr == "PN":
            self._do(ds, tag, int(tag), "D", ctx, "", _Mode.NORMAL)
        elif vr == "DA" or vr == "DT":
            ctx.report.count("C")
            self._date(ds._dict, tag, vr, ctx, "C")

    def _choose(self, code: str, ctx: _Ctx, path: str, t: int) -> str:
        if ctx.types is None:
            return deid_iod.choose(code, None, False)
        return deid_iod.choose(code, ctx.types.get(f"{path}{t:08X}"), True)

    def _walk_items(self, ds: Dataset, tag: BaseTag, ctx: _Ctx, path: str, mode: _Mode) -> None:
        elem = ds[tag]
        sub = f"{path}{int(tag):08X}:"
        if mode == _Mode.DUMMY:
            for item in elem.value or ():
                self._dummy_item(item, ctx, sub)
            return
        for item in elem.value or ():
            self._walk(item, ctx, sub, mode)

    def _dummy_item(self, item: Dataset, ctx: _Ctx, path: str) -> None:
        """An item of a sequence whose action is D: every value becomes a dummy of its VR, at
        any depth, coded concepts and numbers included (an identification code *is* the
        identifier). The stricter action wins: the table's X and Z on a nested attribute still
        remove or empty it; K, C and U give way to D. Private elements, group lengths and
        repeating groups go, as no dummy keeps them meaningful."""
        d = item._dict
        actions = self._plan.actions
        for tag in list(d):
            t = int(tag)
            act = actions.get(t)
            if act is not None and len(act) > 1:
                act = self._choose(act, ctx, path, t)
            if act == "X" or act == "Z":
                self._do(item, tag, t, act, ctx, path, _Mode.DUMMY)
                continue
            g = t >> 16
            if g & 1 or not t & 0xFFFF or (g & 0xFF00) in (0x5000, 0x6000):
                del d[tag]
                ctx.report.count("X")
                continue
            elem = d[tag]
            vr = _vr_of(elem, t)
            if t in _ENUMERATED and _enumerated(elem, t):
                continue
            ctx.report.count("D")
            if vr == "SQ":
                self._walk_items(item, tag, ctx, path, _Mode.DUMMY)
            elif vr == "UI":
                self._remap(d, tag, elem)  # the same pseudonym as everywhere: references still resolve
            else:
                if vr == "PN":
                    self._note_name(item, tag, ctx)
                n = _multiplicity(elem, vr)
                if n:  # an empty value hides nothing and stays empty
                    self._set(d, tag, vr, _dummy_values(elem, vr, n))

    def _note_name(self, ds: Dataset, tag: BaseTag, ctx: _Ctx) -> None:
        """Keep a person name found anywhere for the audit (raw bytes, and decoded if not ASCII)."""
        for v in _texts(ds, ds._dict[tag], "PN"):
            ctx.originals.add("PersonName", v, True)

    def _note_names_within(self, ds: Dataset, tag: BaseTag, ctx: _Ctx) -> None:
        """Names inside a sequence about to go: a cleaned descriptor elsewhere may quote them."""
        for item in ds[tag].value or ():
            for t in list(item._dict):
                vr = _vr_of(item._dict[t], int(t))
                if vr == "PN":
                    self._note_name(item, t, ctx)
                elif vr == "SQ":
                    self._note_names_within(item, t, ctx)

    def _do(self, ds: Dataset, tag: BaseTag, t: int, action: str, ctx: _Ctx, path: str, mode: _Mode) -> None:
        d = ds._dict
        elem = d[tag]
        vr = _vr_of(elem, t)
        ctx.report.count(action)
        if vr == "PN" and action != "K":
            self._note_name(ds, tag, ctx)
        elif vr == "SQ" and action in ("X", "Z") and self._cleans and _may_hold_names(elem):
            self._note_names_within(ds, tag, ctx)
        if action == "X":
            del d[tag]
            return
        if action == "K":
            if vr == "SQ":
                self._walk_items(ds, tag, ctx, path, mode)
            return
        if action == "Z":
            self._set(d, tag, vr, Sequence() if vr == "SQ" else None)
            return
        if action == "U":
            if vr == "SQ":
                self._walk_items(ds, tag, ctx, path, mode)
            elif vr == "UI":
                self._remap(d, tag, elem)
            else:
                self._set(d, tag, vr, None)
            return
        if action == "D":
            if vr == "SQ":
                self._walk_items(ds, tag, ctx, path, _Mode.DUMMY)
            elif vr == "UI":
                if _str_values(elem):
                    self._remap(d, tag, elem)
                else:
                    self._set(d, tag, vr, pseudonymize_uid(self._key, "dummy"))
            else:
                self._set(d, tag, vr, _dummy_values(elem, vr, max(1, _multiplicity(elem, vr))))
            return
        if action == "C":
            if vr == "SQ":
                self._walk_clean_items(ds, tag, ctx, path)
            elif vr in _DATE_VRS:
                self._date(d, tag, vr, ctx, "C")
            elif vr in _TEXT_VRS or vr in ("CS", "AS"):
                self._clean_text(ds, tag, vr, ctx)
            elif vr == "UI":
                self._remap(d, tag, elem)
            elif vr in _BINARY_VRS:
                self._set(d, tag, vr, None)
            # numbers are kept as they are
            return
        raise DeidentificationError(f"unknown action {action!r} for tag {t:08X}")

    # -- value helpers -------------------------------------------------------------------
    @staticmethod
    def _set(d: MutableMapping[BaseTag, Any], tag: BaseTag, vr: str, value: Any) -> None:
        """Replace an element. An ASCII text value replacing a raw element becomes a raw element
        in the same encoding, so the writer copies its bytes instead of re-encoding it."""
        if vr == "UN":
            vr = "OB"
        old = d.get(tag)
        if old is not None and old.__class__ is RawDataElement and vr in _RAW_TEXT_VRS:
            raw: bytes | None
            if value is None:
                raw = b""
            elif value.__class__ is str:
                raw = value.encode("ascii", "strict") if value.isascii() else None
            elif isinstance(value, list) and all(v.__class__ is str and v.isascii() for v in value):
                raw = "\\".join(value).encode("ascii")
            else:
                raw = None
            if raw is not None:
                if len(raw) & 1:
                    raw += b"\x00" if vr == "UI" else b" "
                d[tag] = RawDataElement(tag, vr, len(raw), raw, 0, old.is_implicit_VR, old.is_little_endian, True, False)
                return
        d[tag] = DataElement(tag, vr, value)

    def _remap(self, d: MutableMapping[BaseTag, Any], tag: BaseTag, elem: Any) -> None:
        values = _str_values(elem)
        if not values:
            return
        new = [self.uid(v) for v in values]
        self._set(d, tag, "UI", new if len(new) > 1 else new[0])

    def _date(self, d: MutableMapping[BaseTag, Any], tag: BaseTag, vr: str, ctx: _Ctx, action: str) -> None:
        if Option.RETAIN_FULL_DATES in self.options:
            return
        if vr == "TM" or action == "K":
            return
        if Option.RETAIN_MODIFIED_DATES in self.options:
            values = _str_values(d[tag])
            shifted = _shift_temporal(values if len(values) != 1 else values[0], vr, ctx.shift) if values else None
            self._set(d, tag, vr, shifted)
        else:
            self._set(d, tag, vr, _DUMMY_BY_VR[vr] if action == "D" else None)

    def _clean_text(self, ds: Dataset, tag: BaseTag, vr: str, ctx: _Ctx) -> None:
        """C for text: queued, carried out by :meth:`_clean_pending` after the walk."""
        ctx.pending.append((ds, tag, vr))

    def _clean_pending(self, ctx: _Ctx) -> None:
        if not ctx.pending:
            return
        originals = ctx.originals
        longs = {t if isinstance(t, str) else t.decode("latin-1") for toks in originals.tokens().values() for t in toks}
        scrub = descriptors.scrubber(longs, originals.short_name_parts())
        for ds, tag, vr in ctx.pending:
            self._clean_now(ds, tag, vr, scrub)
        ctx.pending.clear()

    def _clean_now(self, ds: Dataset, tag: BaseTag, vr: str, scrub: descriptors.Scrubber | None) -> None:
        """Drop the object's identifying values, names after titles, dates and IDs."""
        elem = ds.get(tag)  # decoded with the dataset's character set
        value = elem.value if elem is not None else None
        if value is None or value == "":
            return
        values = [str(v) for v in items_of(value)]
        out = [descriptors.clean_descriptor(v, scrub) for v in values]
        if vr == "PN":
            out = [_DUMMY_TEXT for _ in out]  # a person name is never "cleaned" into another name
        if out == values:
            return
        kept = [v for v in out if v]
        self._set(ds._dict, tag, vr, (kept if len(kept) > 1 else kept[0]) if kept else None)

    def _walk_clean_items(self, ds: Dataset, tag: BaseTag, ctx: _Ctx, path: str) -> None:
        """C on a sequence: structured content is cleaned item by item, other text cleaned."""
        elem = ds[tag]
        sub = f"{path}{int(tag):08X}:"
        kept = []
        for item in elem.value or ():
            vt = item.get(_VALUE_TYPE)
            value_type = str(vt.value).strip() if vt is not None else ""
            if value_type == "PNAME":
                if 0x0040A123 in item._dict:
                    self._note_name(item, Tag(0x0040A123), ctx)
                ctx.report.count("X")
                continue
            self._walk(item, ctx, sub, _Mode.CLEAN)
            kept.append(item)
        if len(kept) != len(elem.value or ()):
            elem.value = Sequence(kept)

    def _repeating_group(self, ds: Dataset, tag: BaseTag, g: int, ctx: _Ctx) -> None:
        d = ds._dict
        if tag not in d:
            return
        overlay = (g & 0xFF00) == 0x6000
        action = self._plan.overlay.get(0x3000, "X") if overlay else self._plan.curve
        group_tags = [x for x in d if (int(x) >> 16) == g]
        if action != "C":
            for x in group_tags:
                del d[x]
            ctx.report.count("X", len(group_tags))
            return
        for x in group_tags:
            t = int(x)
            elem = d[x]
            vr = _vr_of(elem, t)
            if overlay and (t & 0xFFFF) == 0x3000:
                length = len(elem.value or b"")
                self._set(d, x, "OB" if vr == "OB" else "OW", b"\x00" * length)
                ctx.report.count("C")
            elif vr in _TEXT_VRS:
                self._clean_text(ds, x, vr, ctx)
                ctx.report.count("C")

    def _private(self, ds: Dataset, ctx: _Ctx) -> None:
        d = ds._dict
        privates = [t for t in d if (int(t) >> 16) & 1]
        if self._plan.private != "C" or not self._safe_private:
            for t in privates:
                del d[t]
            ctx.report.count("X", len(privates))
            return
        creators: dict[tuple[int, int], str] = {}
        for t in privates:
            e = int(t) & 0xFFFF
            if 0x0010 <= e <= 0x00FF:
                value = d[t].value
                vals = [value.decode("latin-1").strip("\x00 ")] if isinstance(value, bytes) else _str_values(d[t])
                creators[(int(t) >> 16, e)] = (vals[0] if vals else "").strip().upper()
        kept_blocks: set[tuple[int, int]] = set()
        removed = kept = 0
        for t in privates:
            ti = int(t)
            g, e = ti >> 16, ti & 0xFFFF
            if 0x0010 <= e <= 0x00FF or e < 0x0010:
                continue
            block = (g, e >> 8)
            creator = creators.get(block)
            vr = self._safe_private.get((g, creator, e & 0xFF)) if creator else None
            if vr and _safe_value(d[t], vr):
                kept_blocks.add(block)
                kept += 1
                elem = d[t]
                if isinstance(elem, RawDataElement) and elem.VR in (None, "UN"):
                    d[t] = DataElement(t, vr, _convert_raw(elem, vr, ds))
            else:
                del d[t]
                removed += 1
        for t in privates:
            ti = int(t)
            g, e = ti >> 16, ti & 0xFFFF
            if e <= 0x00FF and t in d and (g, e) not in kept_blocks:
                del d[t]
                removed += 1
        ctx.report.count("X", removed)
        ctx.report.count("C", kept)

    def _replace_file_meta(self, ds: Dataset) -> None:
        """E.1.1 step 7: the file meta describes the de-identifying application; preamble zeroed."""
        old = getattr(ds, "file_meta", None)
        meta = FileMetaDataset()
        if old is not None and "TransferSyntaxUID" in old:
            meta.TransferSyntaxUID = old.TransferSyntaxUID
        if "SOPClassUID" in ds:
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
        elif old is not None and "MediaStorageSOPClassUID" in old:
            meta.MediaStorageSOPClassUID = old.MediaStorageSOPClassUID
        if "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        elif old is not None and "MediaStorageSOPInstanceUID" in old:
            meta.MediaStorageSOPInstanceUID = UID(self.uid(str(old.MediaStorageSOPInstanceUID)))
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128


def _rebuild(key: bytes, options: tuple[str, ...], pixel_policy: str | None, masks: tuple, audit: bool,
             recipe: SiteRecipe | None, ocr: OcrConfig) -> Deidentifier:
    return Deidentifier(key, options, pixel_policy=pixel_policy, pixel_masks=masks, audit=audit, recipe=recipe,
                        pixel_ocr=ocr)


_Choice = TypeVar("_Choice", Option, PixelPolicy)


def _member(choices: type[_Choice], value: _Choice | str, what: str) -> _Choice:
    try:
        return choices(value)
    except ValueError:
        names = ", ".join(c.value for c in choices)
        raise DeidentificationError(f"unknown {what}; choose from: {names}") from None


@cache
def _plan_for(options: tuple[Option, ...]) -> _Plan:
    return _Plan(load_profile(), options)


_BINARY_SIZES = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "UV": 8, "SV": 8, "AT": 4}
# VRs whose values are ASCII by definition: a backslash in their bytes always separates values.
_ASCII_MULTI_VRS = frozenset({"AS", "CS", "DA", "DS", "DT", "IS", "TM"})


def _multiplicity(elem: Any, vr: str) -> int:
    """How many values ``elem`` holds (0 when empty), read without converting a raw element.
    Free-text VRs count as one value: their bytes may be multi-byte text."""
    value = elem.value
    if value is None:
        return 0
    if isinstance(value, (bytes, bytearray)):
        size = _BINARY_SIZES.get(vr)
        if size is not None:
            return max(1, len(value) // size) if value else 0  # a malformed length is not kept either
        if vr in _BINARY_VRS:
            return 1 if value else 0
        text = bytes(value).strip(b"\x00 ")
        if not text:
            return 0
        return text.count(b"\\") + 1 if vr in _ASCII_MULTI_VRS else 1
    if isinstance(value, str):
        return 1 if value.strip("\x00 ") else 0
    if isinstance(value, (list, tuple, MultiValue)):
        return len(value)
    return 1 if str(value) else 0


def _may_hold_names(elem: Any) -> bool:
    """Whether a sequence may hold a person name: an unparsed explicit-VR sequence without the
    bytes ``PN`` has none (every PN element there carries its VR), so it need not be parsed
    just to be removed."""
    if elem.__class__ is RawDataElement and elem.is_implicit_VR is False:
        return b"PN" in (elem.value or b"")
    return True


def _enumerated(elem: Any, t: int) -> bool:
    """Every value of ``elem`` is one of the closed set the standard enumerates for ``t``."""
    values = _str_values(elem)
    return bool(values) and all(v.strip().upper() in _ENUMERATED[t] for v in values)


def _dummy_values(elem: Any, vr: str, n: int) -> Any:
    """``n`` dummy values of the VR (one value as itself). Binary values become zeros of their
    own length (8 bytes when empty: a valid length for every binary VR)."""
    if vr in _BINARY_VRS:
        size = len(elem.value or b"")
        return b"\x00" * (size + (size & 1) if size else 8)
    one = _DUMMY_BY_VR.get(vr, _DUMMY_TEXT)
    return [one] * n if n > 1 else one


_CS_SAFE = re.compile(r"^[A-Z0-9_ ]*$")
_NUM_SAFE = re.compile(r"^[0-9+\-.eE ]*$")


def _safe_value(elem: Any, vr: str) -> bool:
    """Retain Safe Private: only VRs that cannot carry free text (PS3.15 E.3.10 note 2)."""
    if vr in _NUMERIC_BINARY_VRS:
        return True
    if vr in ("IS", "DS", "CS"):
        raw = elem.value
        if isinstance(raw, bytes):
            text = raw.decode("latin-1").strip("\x00 ")
        else:
            text = "\\".join(_str_values(elem))
        parts = text.split("\\")
        pattern = _CS_SAFE if vr == "CS" else _NUM_SAFE
        return all(pattern.match(p.strip()) for p in parts)
    return False


def _convert_raw(elem: RawDataElement, vr: str, ds: Dataset) -> Any:
    """Implicit-VR private element known from the safe list: decode its value with the listed VR."""
    from pydicom.dataelem import convert_raw_data_element

    return convert_raw_data_element(elem._replace(VR=vr), encoding=ds._character_set, ds=ds).value


_SHIFTED: dict[tuple[str, int], str | None] = {}


def _shift_one(s: str, days: int) -> str | None:
    key = (s, days)
    out = _SHIFTED.get(key, "")
    if out != "":
        return out
    try:
        day = dt.date(int(s[0:4]), int(s[4:6]), int(s[6:8])) + dt.timedelta(days=days)
        out = f"{day.year:04d}{day.month:02d}{day.day:02d}" + s[8:]
    except (ValueError, OverflowError):
        out = None  # unparseable dates are not kept
    if len(_SHIFTED) >= CACHE_ENTRIES:
        _SHIFTED.clear()
    _SHIFTED[key] = out
    return out


def _shift_temporal(value, vr: str, days: int):
    if not value:
        return value
    if vr == "TM":
        return value  # whole-day shifts keep times of day
    out: list[str | None] = []
    for v in items_of(value):
        s = str(v).strip()
        if len(s) < 8 or not s[:8].isdigit():
            out.append(None)
            continue
        shifted = _shift_one(s if vr == "DT" else s[:8], days)
        out.append(shifted)
    kept = [v for v in out if v is not None]
    if not kept:
        return None
    return kept if len(kept) > 1 else kept[0]


def encoded_forms(token: str | bytes, encodings: list[str]) -> set[bytes]:
    """A value as bytes in every encoding it may take in a file: the original bytes, UTF-8,
    Latin-1 and the object's own character set (ISO 2022 escapes included)."""
    if isinstance(token, bytes):
        return {token}
    forms = {token.encode("utf-8")}
    for enc in ("latin-1",):
        try:
            forms.add(token.encode(enc))
        except UnicodeEncodeError:
            pass
    try:
        forms.add(encode_string(token, encodings))
    except (UnicodeEncodeError, LookupError, ValueError):
        pass
    return {f for f in forms if f}
