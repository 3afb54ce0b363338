"""De-identification: DICOM PS3.15 Annex E Table E.1-1, applied by a pure function.

The table is data (``tasks/data/ps3.15-table-e1-1-2024b.json``, copied from the standard's
edition named in it), never hand-typed rules. This first version applies the Basic Profile
and the option columns selected in settings; where the table says "unless required for IOD
conformance" (Z/D, X/D, X/Z, X/Z/D, X/Z/U*) it takes the choice that is conformant whatever
the attribute's type in the object's IOD (D over Z over X; U* keeps the sequence and remaps
its UIDs), which never keeps an original value.

Pseudonyms and UIDs come from HMAC-SHA256 under the secret key, so they are the same on
every run and for every study of a patient, and cannot be recomputed without the key.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Iterable

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from tasks.errors import DeidentificationError

TABLE_RESOURCE = "ps3.15-table-e1-1-2024b.json"
RECIPE_VERSION = "pacsflow-deid-1"
DEID_METHOD_CODE = "113100"  # Basic Application Confidentiality Profile (CID 7050)


class Option(str, enum.Enum):
    """The option columns of Table E.1-1, by the name the table uses."""

    CLEAN_DESCRIPTORS = "Clean Descriptors"
    CLEAN_GRAPHICS = "Clean Graphics"
    CLEAN_STRUCTURED_CONTENT = "Clean Structured Content"
    RETAIN_DEVICE_IDENTITY = "Retain Device Identity"
    RETAIN_INSTITUTION_IDENTITY = "Retain Institution Identity"
    RETAIN_FULL_DATES = "Retain Long. Full Dates"
    RETAIN_MODIFIED_DATES = "Retain Long. Modified Dates"
    RETAIN_PATIENT_CHARACTERISTICS = "Retain Patient Characteristics"
    RETAIN_SAFE_PRIVATE = "Retain Safe Private"
    RETAIN_UIDS = "Retain UIDs"


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

DEFAULT_OPTIONS = (Option.RETAIN_MODIFIED_DATES,)

_DUMMY_TEXT = "ANONYMIZED"
_DUMMY_BY_VR: dict[str, object] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "IS": "0",
    "DS": "0",
    "CS": _DUMMY_TEXT,
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "UV": 0,
    "SV": 0,
    "FL": 0.0,
    "FD": 0.0,
}
_MAX_DAY_SHIFT = 365  # days; dates move back by 1..365 days per patient

# The identifiers we replace by keyed pseudonyms rather than the table's empty value:
# analysts need a stable per-patient key.
_PATIENT_ID = Tag(0x0010, 0x0020)
_PATIENT_NAME = Tag(0x0010, 0x0010)
_PATIENT_IDENTITY_REMOVED = Tag(0x0012, 0x0062)


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
    with resources.files("tasks.data").joinpath(TABLE_RESOURCE).open("r", encoding="utf-8") as fh:
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

    def count(self, action: str) -> None:
        self.actions[action] = self.actions.get(action, 0) + 1


class Deidentifier:
    """Applies the profile to Datasets in place. Holds the key; never logs values."""

    def __init__(self, key: bytes, options: Iterable[Option | str] = DEFAULT_OPTIONS) -> None:
        if not key:
            raise DeidentificationError("an empty de-identification key is not allowed")
        self._key = key
        self.options = tuple(sorted({Option(o) for o in options}, key=lambda o: o.value))
        if Option.RETAIN_FULL_DATES in self.options and Option.RETAIN_MODIFIED_DATES in self.options:
            raise DeidentificationError("choose one of the full-dates and modified-dates options")
        self.profile = load_profile()
        self._uid_cache: dict[str, str] = {}

    # -- identifiers -----------------------------------------------------------------
    def uid(self, uid: str) -> str:
        if Option.RETAIN_UIDS in self.options:
            return uid
        new = self._uid_cache.get(uid)
        if new is None:
            if len(self._uid_cache) > 100_000:
                self._uid_cache.clear()
            new = self._uid_cache[uid] = pseudonymize_uid(self._key, uid)
        return new

    def study_ref(self, original: str) -> str:
        """The name of a study in logs, run names, paths and artifacts: always the keyed
        ``2.25.`` pseudonym, even under Retain UIDs, so no original UID is shown."""
        return pseudonymize_uid(self._key, original)

    def method_description(self) -> str:
        names = ["Basic Application Confidentiality Profile"] + [o.value for o in self.options]
        return f"PS3.15 E.1-1 {self.profile.edition}; {RECIPE_VERSION}; " + "; ".join(names)

    def _action(self, rule: Rule) -> str:
        for option in self.options:
            action = rule.options.get(option.value)
            if action:
                return action
        return rule.basic

    # -- the walk ----------------------------------------------------------------------
    def apply(self, ds: Dataset, report: DeidReport | None = None) -> Dataset:
        report = report if report is not None else DeidReport()
        original_pid = str(ds.get("PatientID", "") or "")
        shift = patient_day_shift(self._key, original_pid)
        self._walk(ds, report, shift, top=True)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            self._walk(meta, report, shift, top=False)
            if "SOPInstanceUID" in ds:
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        pseudonym = patient_pseudonym(self._key, original_pid)
        ds.PatientID = pseudonym
        ds.PatientName = pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = self.method_description()[:64]
        codes = Sequence()
        for value, meaning in [(DEID_METHOD_CODE, "Basic Application Confidentiality Profile")] + [
            OPTION_CODES[o] for o in self.options
        ]:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            codes.append(item)
        ds.DeidentificationMethodCodeSequence = codes
        if Option.RETAIN_MODIFIED_DATES in self.options:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        elif Option.RETAIN_FULL_DATES in self.options:
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        return ds

    def _rule_for(self, tag: BaseTag) -> Rule | None:
        group = tag.group
        if group % 2 == 1:
            return self.profile.private_rule
        if 0x6000 <= group <= 0x60FF and group % 2 == 0:
            return self.profile.overlay_rules.get(tag.element)
        if 0x5000 <= group <= 0x50FF and group % 2 == 0:
            return self.profile.curve_rule
        return self.profile.rules.get(int(tag))

    def _walk(self, ds: Dataset, report: DeidReport, shift: int, top: bool) -> None:
        for tag in list(ds.keys()):
            if top and tag in (_PATIENT_ID, _PATIENT_NAME, _PATIENT_IDENTITY_REMOVED):
                continue
            rule = self._rule_for(tag)
            if rule is None:
                elem = ds[tag]
                if elem.VR == "SQ":
                    self._walk_sequence(elem, report, shift)
                continue
            action = self._action(rule)
            self._do(ds, tag, action, report, shift)

    def _walk_sequence(self, elem: DataElement, report: DeidReport, shift: int) -> None:
        for item in elem.value or ():
            self._walk(item, report, shift, top=False)

    def _do(self, ds: Dataset, tag: BaseTag, action: str, report: DeidReport, shift: int) -> None:
        elem = ds[tag]
        vr = elem.VR
        if action == "X/Z/U*":
            action = "U" if vr in ("SQ", "UI") else "Z"
        elif action in ("Z/D", "X/D", "X/Z/D"):
            action = "D"
        elif action == "X/Z":
            action = "Z"
        report.count(action)
        if action == "K":
            if vr == "SQ":
                self._walk_sequence(elem, report, shift)
            return
        if action == "X" or (action == "C" and vr not in ("DA", "DT", "TM")):
            # "Clean" for anything but dates needs a vetted vocabulary we do not have yet: remove.
            del ds[tag]
            return
        if action == "C":
            elem.value = _shift_temporal(elem.value, vr, shift)
            return
        if action == "U":
            if vr == "SQ":
                self._walk_sequence(elem, report, shift)
            elif vr == "UI":
                elem.value = _map_multi(elem.value, self.uid)
            else:
                del ds[tag]
            return
        if action == "Z":
            if vr == "SQ":
                elem.value = Sequence()
            else:
                elem.value = None
            return
        if action == "D":
            if vr == "SQ":
                self._walk_sequence(elem, report, shift)
            elif vr == "UI":
                elem.value = _map_multi(elem.value, self.uid)
            elif vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
                elem.value = b""
            else:
                dummy = _DUMMY_BY_VR.get(vr, _DUMMY_TEXT)
                if vr in ("SH", "AE", "CS") and isinstance(dummy, str):
                    dummy = dummy[:16]
                elem.value = dummy
            return
        raise DeidentificationError(f"unknown action {action!r} for tag {tag}")


def _map_multi(value, fn):
    if value is None or value == "":
        return value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [fn(str(v)) for v in value]
    return fn(str(value))


def _shift_temporal(value, vr: str, days: int):
    if not value:
        return value
    if vr == "TM":
        return value  # whole-day shifts keep times of day
    values = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
    out = []
    for v in values:
        s = str(v)
        try:
            day = dt.datetime.strptime(s[:8], "%Y%m%d").date() + dt.timedelta(days=days)
        except ValueError:
            out.append(None)  # unparseable dates are not kept
            continue
        out.append(day.strftime("%Y%m%d") + (s[8:] if vr == "DT" else ""))
    kept = [v for v in out if v is not None]
    if not kept:
        return None
    return kept if len(kept) > 1 else kept[0]


def file_meta_for(ds: Dataset) -> FileMetaDataset:
    """Ensure a file meta group consistent with the de-identified dataset."""
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta = meta
    return meta
