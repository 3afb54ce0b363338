"""ADT messages → FHIR R4 Patient changes and merge plans: pure functions (no FHIR calls).

PID → Patient follows the HL7 Version 2-to-FHIR implementation guide (segment PID to Patient and
the data type and vocabulary maps it refers to):

==========  ===================================================================================
PID-3       ``identifier``: CX-1 value, system from the assigning authority (CX-4 namespace, else
            its universal id) through ``MappingConfig.identifier_systems``, else
            ``default_identifier_system``; CX-5 → ``type`` (v2 table 0203)
PID-5/-9    ``name`` (XPN → HumanName; XPN-7 → ``use`` via table 0200: L official, D usual,
            N nickname, M maiden, S anonymous, TEMP temp, BAD/NOUSE old); the alias names of
            PID-9 keep their own XPN-7 (the guide maps both fields to ``name``)
PID-7       ``birthDate`` at the precision sent (YYYY, YYYY-MM, YYYY-MM-DD)
PID-8       ``gender`` via table 0001: F female, M male, O/A/N other, U unknown
PID-11      ``address`` (XAD; XAD-7 H home, B/O work, C temp, BA old, M postal, P physical)
PID-13/-14  ``telecom`` (XTN; home and work numbers; e-mail when XTN-3 says Internet)
PID-15      ``communication.language``
PID-16      ``maritalStatus`` (v2 table 0002 coding, plus the v3 MaritalStatus code when one matches)
PID-29/-30  ``deceasedDateTime`` when a date is sent, else ``deceasedBoolean`` from Y/N
EVN-2/MSH-7 ``PatientChange.last_updated`` (``meta.lastUpdated`` belongs to the server)
==========  ===================================================================================

A present field replaces the element; an absent field is no information (a sparse A08 keeps what
it omits); HL7's explicit null ``""`` erases the element (:func:`merge_patient`).

Research mode writes into the Patient the imaging sync created: the identifier is
(``pseudonym_system``, ``patient_pseudonym(key, DICOM PatientID)``) where the DICOM PatientID is
the PID-3 identifier of ``research_authority``, with the same resource id and PSEUDED label as
:mod:`pacsflow.tasks.fhir.mapping`. Demographics are cut to what the de-identification profile
lets through (PS3.15 Retain Patient Characteristics keeps sex and a capped age; dates are removed):
``gender``; ``birthDate`` as the year only, and none when the person is 90 or older at the message
time (HIPAA Safe Harbor: a year that reveals an age over 89 is an identifier); ``deceasedBoolean``
(never the date). Names, addresses, telecom, language, marital status and other identifiers are
dropped.

A40 (the guide has no map for it; ours): PID is the surviving patient, MRG-1 the merged one. The
survivor gets ``link`` {other: merged, type: replaces}; the merged Patient gets ``active`` false
and ``link`` {other: survivor, type: replaced-by}. Nothing else moves: resources that point at the
merged Patient keep pointing there, and the link tells readers where the person lives now. A
repeated A40 with the two sides swapped would make each replace the other; :func:`is_swapped_repeat`
detects it so the caller rejects it.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pacsflow.tasks.deid.deidentifier import patient_pseudonym
from pacsflow.tasks.fhir.mapping import SECURITY_SYSTEM, Identity, identifier_key, patient_identity
from pacsflow.tasks.fhir.mapping import merge_patient as merge_patient  # the one sparse merge, shared with the sync
from pacsflow.tasks.hl7.message import (
    APPLICATION_INTERNAL_ERROR,
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    TABLE_VALUE_NOT_FOUND,
    AdtMessage,
    Hl7Error,
    Repetition,
    Segment,
    parse_timestamp,
    part,
)

HL7_NULL = '""'
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0002 = "http://terminology.hl7.org/CodeSystem/v2-0002"
V3_MARITAL = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus"
BCP47 = "urn:ietf:bcp:47"
_SAFE_HARBOR_YEARS = 90

_GENDER = {"F": "female", "M": "male", "O": "other", "A": "other", "N": "other", "U": "unknown"}
_NAME_USE = {"L": "official", "D": "usual", "N": "nickname", "M": "maiden", "S": "anonymous",
             "TEMP": "temp", "BAD": "old", "NOUSE": "old"}
_ADDRESS_USE = {"H": "home", "B": "work", "O": "work", "C": "temp", "BA": "old"}
_ADDRESS_TYPE = {"M": "postal", "P": "physical"}
_TELECOM_USE = {"PRN": "home", "WPN": "work", "VHN": "home", "ORN": "home", "EMR": "home"}
_TELECOM_SYSTEM = {"PH": "phone", "FX": "fax", "CP": "phone", "BP": "pager", "Internet": "email",
                   "X.400": "email"}
_MARITAL_V3 = {"A": "L", "D": "D", "M": "M", "S": "S", "W": "W", "C": "C", "P": "T", "R": "T",
               "E": "L", "N": "A", "I": "I", "B": "U"}


class Mode(str, enum.Enum):
    IDENTIFIED = "identified"
    RESEARCH = "research"


@dataclass(frozen=True)
class MappingConfig:
    mode: Mode
    identifier_systems: Mapping[str, str] = field(default_factory=dict)
    #: PID-3 identifiers whose authority is empty or not in ``identifier_systems``. A local URN
    #: rather than no system: a conditional update on an identifier without system would match
    #: any system's identifier of that value.
    default_identifier_system: str = "urn:pacsflow:hl7:unknown-authority"
    research_authority: str = ""
    pseudonym_system: str = "urn:pacsflow:pseudonym"
    key: bytes | None = field(default=None, repr=False)
    #: Research mode: gender only under PS3.15 Retain Patient Characteristics (as the imaging keeps it).
    retain_characteristics: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))
        if self.mode is Mode.RESEARCH and (not self.key or not self.research_authority):
            raise ValueError("research mode needs the de-identification key and research_authority")

    def system_for(self, authority: str) -> str:
        return self.identifier_systems.get(authority, self.default_identifier_system)


@dataclass(frozen=True)
class PatientChange:
    """What one message says about one Patient."""

    identity: Identity = field(repr=False)           # identified mode: the hospital's identifier
    resource: dict[str, Any] = field(repr=False)     # valid FHIR Patient JSON: only what the message carries
    last_updated: dt.datetime | None
    event: str
    erased: frozenset[str] = frozenset()   # elements the message nulled with ``""``

    @property
    def update(self) -> dict[str, Any]:
        """``resource`` with ``None`` for each erased element: the input of :func:`merge_patient`."""
        return {**self.resource, **{name: None for name in self.erased}}


# -- data types -------------------------------------------------------------------------------------
def _authority(rep: Repetition) -> str:
    return (part(rep, 4, 1) or part(rep, 4, 2)).strip()


def _identifier(rep: Repetition, config: MappingConfig) -> dict[str, Any] | None:
    value = part(rep, 1).strip()
    if not value or value == HL7_NULL:
        return None
    ident: dict[str, Any] = {"system": config.system_for(_authority(rep)), "value": value}
    kind = part(rep, 5).strip()
    if kind:
        ident["type"] = {"coding": [{"system": V2_0203, "code": kind}]}
    return ident


def _human_name(rep: Repetition) -> dict[str, Any] | None:
    family = part(rep, 1).strip()
    given = [g for g in (part(rep, 2).strip(), *part(rep, 3).split(" ")) if g.strip()]
    name: dict[str, Any] = {}
    if family:
        name["family"] = family
    if given:
        name["given"] = [g.strip() for g in given]
    for key, comp in (("suffix", 4), ("prefix", 5)):
        if part(rep, comp).strip():
            name[key] = [part(rep, comp).strip()]
    if not name:
        return None
    use = _NAME_USE.get(part(rep, 7).strip())
    return {**name, "use": use} if use else name


def _address(rep: Repetition) -> dict[str, Any] | None:
    addr: dict[str, Any] = {}
    lines = [part(rep, n).strip() for n in (1, 2) if part(rep, n).strip()]
    if lines:
        addr["line"] = lines
    for key, comp in (("city", 3), ("state", 4), ("postalCode", 5), ("country", 6)):
        if part(rep, comp).strip():
            addr[key] = part(rep, comp).strip()
    if not addr:
        return None
    kind = part(rep, 7).strip()
    if kind in _ADDRESS_USE:
        addr["use"] = _ADDRESS_USE[kind]
    if kind in _ADDRESS_TYPE:
        addr["type"] = _ADDRESS_TYPE[kind]
    return addr


def _contact_point(rep: Repetition, default_use: str) -> dict[str, Any] | None:
    equipment = part(rep, 3).strip()
    system = _TELECOM_SYSTEM.get(equipment, "phone")
    number = "".join(p for p in (part(rep, 5), part(rep, 6), part(rep, 7)) if p.strip())
    value = (part(rep, 4) if system == "email" else "") or part(rep, 12) or number or part(rep, 1)
    if not value.strip():
        return None
    point = {"system": system, "value": value.strip(), "use": _TELECOM_USE.get(part(rep, 2).strip(), default_use)}
    if equipment == "CP":
        point["use"] = "mobile"
    return point


def _coded(rep: Repetition, systems: Mapping[str, str]) -> dict[str, Any] | None:
    code, text = part(rep, 1).strip(), part(rep, 2).strip()
    if not code and not text:
        return None
    concept: dict[str, Any] = {}
    if code:
        coding = {"code": code, **({"display": text} if text else {})}
        system = systems.get(part(rep, 3).strip().upper())
        concept["coding"] = [{"system": system, **coding} if system else coding]
    if text:
        concept["text"] = text
    return concept


def _fhir_date(stamp: str, location: str) -> str | None:
    """An HL7 DTM as a FHIR date at the precision sent."""
    digits = stamp.strip()[:8]
    if not digits:
        return None
    if len(digits) not in (4, 6, 8) or not digits.isdigit():
        raise Hl7Error("not an HL7 date", location=location, code=DATA_TYPE_ERROR)
    parse_timestamp(digits, location)  # month and day in range
    return "-".join(p for p in (digits[:4], digits[4:6], digits[6:8]) if p)


def _fhir_datetime(stamp: str, location: str) -> str | None:
    """An HL7 DTM as a FHIR dateTime: with its time only when it has an offset (FHIR requires one)."""
    moment = parse_timestamp(stamp, location)
    if moment is None:
        return None
    digits = re.match(r"\d*", stamp.strip())
    if moment.tzinfo is None or digits is None or len(digits.group()) <= 8:
        return _fhir_date(stamp, location)
    return moment.isoformat()


# -- PID fields --------------------------------------------------------------------------------------
_ABSENT, _NULL = "absent", "null"


def _state(pid: Segment, n: int) -> str | tuple[Repetition, ...]:
    """A field's repetitions, or whether it is absent (no information) or HL7's explicit null."""
    reps = pid.repetitions(n)
    leaves = [s for rep in reps for comp in rep for s in comp]
    if not any(s.strip() for s in leaves):
        return _ABSENT
    if [s for s in leaves if s.strip()] == [HL7_NULL]:
        return _NULL
    return reps


def _list_element(pid: Segment, sources: tuple[tuple[int, Any], ...]) -> list[Any] | str:
    """A repeating element fed by one or more fields: its items, ``_NULL`` or ``_ABSENT``."""
    items: list[Any] = []
    states = [(_state(pid, n), build) for n, build in sources]
    for state, build in states:
        if not isinstance(state, str):
            items += [x for x in (build(rep) for rep in state) if x]
    if items:
        return items
    return _NULL if any(state == _NULL for state, _ in states) else _ABSENT


_LANGUAGE_SYSTEMS = {"ISO639": BCP47, "ISO6391": BCP47, "HL70296": "http://terminology.hl7.org/CodeSystem/v2-0296"}
_LIST_ELEMENTS: tuple[tuple[str, tuple[tuple[int, Any], ...]], ...] = (
    ("name", ((5, _human_name), (9, _human_name))),
    ("address", ((11, _address),)),
    ("telecom", ((13, lambda r: _contact_point(r, "home")), (14, lambda r: _contact_point(r, "work")))),
    ("communication", ((15, lambda r: (c := _coded(r, _LANGUAGE_SYSTEMS)) and {"language": c}),)),
)


def _gender(pid: Segment) -> str:
    code = pid.value(8).strip().upper()
    if code not in _GENDER:
        raise Hl7Error("administrative sex not in HL7 table 0001", location="PID-8", code=TABLE_VALUE_NOT_FOUND)
    return _GENDER[code]


def _marital(pid: Segment) -> dict[str, Any] | None:
    rep = pid.repetitions(16)[0]
    concept = _coded(rep, {})
    code = part(rep, 1).strip().upper()
    if concept is None or not code:
        return concept
    concept["coding"] = [{**concept["coding"][0], "system": V2_0002}]
    if code in _MARITAL_V3:
        concept["coding"].append({"system": V3_MARITAL, "code": _MARITAL_V3[code]})
    return concept


def _deceased(pid: Segment) -> tuple[str, Any] | str:
    """("deceasedDateTime", ...) / ("deceasedBoolean", ...), or ``_NULL`` / ``_ABSENT``."""
    when, flag = _state(pid, 29), _state(pid, 30)
    if not isinstance(when, str):
        stamp = _fhir_datetime(pid.value(29), "PID-29")
        if stamp:
            return "deceasedDateTime", stamp
    if not isinstance(flag, str):
        value = pid.value(30).strip().upper()
        if value not in ("Y", "N"):
            raise Hl7Error("patient death indicator not Y or N", location="PID-30", code=TABLE_VALUE_NOT_FOUND)
        return "deceasedBoolean", value == "Y"
    return _NULL if _NULL in (when, flag) else _ABSENT


def _single_elements(pid: Segment) -> dict[str, Any]:
    """Single-valued elements: value, ``_NULL`` or ``_ABSENT`` by element name."""
    out: dict[str, Any] = {}
    for name, n, build in (("birthDate", 7, lambda: _fhir_date(pid.value(7), "PID-7")),
                           ("gender", 8, lambda: _gender(pid)),
                           ("maritalStatus", 16, lambda: _marital(pid))):
        state = _state(pid, n)
        out[name] = state if isinstance(state, str) else (build() or _ABSENT)
    deceased = _deceased(pid)
    if isinstance(deceased, tuple):
        out[deceased[0]] = deceased[1]
    else:
        out["deceasedBoolean"] = deceased  # erasing one variant erases the choice (merge_patient)
    return out


def _demographics(pid: Segment) -> tuple[dict[str, Any], frozenset[str]]:
    """Every mapped PID element: (present values, names HL7 nulled)."""
    values: dict[str, Any] = _single_elements(pid)
    for name, sources in _LIST_ELEMENTS:
        values[name] = _list_element(pid, sources)
    present = {k: v for k, v in values.items() if not isinstance(v, str) or v not in (_NULL, _ABSENT)}
    return present, frozenset(k for k, v in values.items() if v == _NULL)


# -- Patient changes ---------------------------------------------------------------------------------
def _pid(msg: AdtMessage) -> Segment:
    pid = msg.segment("PID")
    if pid is None:  # parse_adt guarantees one; a hand-built message may not
        raise Hl7Error("PID segment missing", location="PID", code=SEGMENT_SEQUENCE_ERROR)
    return pid


def _last_updated(msg: AdtMessage) -> dt.datetime | None:
    return msg.last_updated


def _research_identity(reps: tuple[Repetition, ...], config: MappingConfig, location: str) -> Identity:
    """The pseudonym Patient of the PID-3/MRG-1 identifier that the DICOM PatientID carries."""
    for rep in reps:
        value = part(rep, 1).strip()
        if value and value != HL7_NULL and _authority(rep) == config.research_authority:
            assert config.key is not None  # MappingConfig checks it in research mode
            return patient_identity(config.pseudonym_system, patient_pseudonym(config.key, value))
    raise Hl7Error("no identifier of the configured research authority", location=location,
                   code=REQUIRED_FIELD_MISSING)


def _identified_identity(reps: tuple[Repetition, ...], config: MappingConfig, location: str) -> Identity:
    for rep in reps:
        ident = _identifier(rep, config)
        if ident is not None:
            return Identity("Patient", ident["system"], ident["value"])
    raise Hl7Error("patient identifier list empty", location=location, code=REQUIRED_FIELD_MISSING)


def identity_of(reps: tuple[Repetition, ...], config: MappingConfig, location: str) -> Identity:
    """The Patient identity a PID-3 / MRG-1 list stands for in this mode."""
    if config.mode is Mode.RESEARCH:
        return _research_identity(reps, config, location)
    return _identified_identity(reps, config, location)


def _pseudonymized(ident: Identity) -> dict[str, Any]:
    # Exactly what the imaging sync gives its Patient, so both writers address one resource.
    return {"id": ident.resource_id,
            "meta": {"security": [{"system": SECURITY_SYSTEM, "code": "PSEUDED", "display": "pseudonymized"}]},
            "identifier": [{"system": ident.system, "value": ident.value}]}


def _birth_year(birth: str, at: dt.datetime | None) -> str | None:
    year = int(birth[:4])
    reference = (at or dt.datetime.now(dt.timezone.utc)).year
    return None if reference - year >= _SAFE_HARBOR_YEARS else birth[:4]


def _research_resource(msg: AdtMessage, ident: Identity, config: MappingConfig,
                       values: dict[str, Any], nulled: frozenset[str]) -> tuple[dict[str, Any], frozenset[str]]:
    doc = _pseudonymized(ident)
    if config.retain_characteristics and "gender" in values:
        doc["gender"] = values["gender"]
    if "birthDate" in values:
        year = _birth_year(values["birthDate"], _last_updated(msg))
        if year:
            doc["birthDate"] = year
    if "deceasedDateTime" in values or "deceasedBoolean" in values:
        doc["deceasedBoolean"] = values.get("deceasedBoolean", True)
    kept = {"birthDate", "deceasedBoolean"} | ({"gender"} if config.retain_characteristics else set())
    return doc, nulled & kept


def patient_change(msg: AdtMessage, config: MappingConfig) -> PatientChange:
    """The Patient the message's PID describes, in the configured mode."""
    pid = _pid(msg)
    ident = identity_of(pid.repetitions(3), config, "PID-3")
    values, nulled = _demographics(pid)
    if config.mode is Mode.RESEARCH:
        doc, erased = _research_resource(msg, ident, config, values, nulled)
    else:
        identifiers = [i for i in (_identifier(r, config) for r in pid.repetitions(3)) if i]
        doc, erased = {"identifier": identifiers, **values}, nulled
    return PatientChange(ident, {"resourceType": "Patient", **doc}, _last_updated(msg), msg.event, erased)


# -- A40 ---------------------------------------------------------------------------------------------
def reference_to(identity: Identity, resource_id: str | None = None) -> dict[str, Any]:
    """A Reference to a Patient: by id when known, else conditional (resolved inside a transaction)."""
    ref = f"Patient/{resource_id}" if resource_id else identity.conditional_url
    return {"reference": ref, "identifier": {"system": identity.system, "value": identity.value}}


@dataclass(frozen=True)
class MergePlan:
    """An A40. Research mode knows both resource ids; identified mode fills them in from the server
    (or leaves conditional references for a transaction)."""

    survivor: PatientChange
    merged: Identity = field(repr=False)
    survivor_id: str | None = None
    merged_id: str | None = None

    def survivor_update(self, merged_id: str | None = None) -> dict[str, Any]:
        link = {"other": reference_to(self.merged, merged_id or self.merged_id), "type": "replaces"}
        return {**self.survivor.update, "link": [link]}

    def merged_update(self, survivor_id: str | None = None) -> dict[str, Any]:
        link = {"other": reference_to(self.survivor.identity, survivor_id or self.survivor_id),
                "type": "replaced-by"}
        return {"identifier": [{"system": self.merged.system, "value": self.merged.value}],
                "active": False, "link": [link]}


def merge_plan(msg: AdtMessage, config: MappingConfig) -> MergePlan:
    """The two sparse updates of an A40 (PID survives, MRG-1 is merged into it)."""
    if msg.event != "A40":
        raise ValueError("merge_plan needs an A40 message")
    mrg = msg.segment("MRG")
    if mrg is None:
        raise Hl7Error("A40 without MRG segment", location="MRG", code=SEGMENT_SEQUENCE_ERROR)
    survivor = patient_change(msg, config)
    merged = identity_of(mrg.repetitions(1), config, "MRG-1")
    if merged == survivor.identity:
        raise Hl7Error("merged and surviving identifiers are the same", location="MRG-1", code=APPLICATION_INTERNAL_ERROR)
    research = config.mode is Mode.RESEARCH
    return MergePlan(survivor, merged, survivor.identity.resource_id if research else None,
                     merged.resource_id if research else None)


def _points_to(link: Mapping[str, Any], doc: Mapping[str, Any] | None, identity: Identity) -> bool:
    other = link.get("other", {})
    ref = other.get("reference")
    if ref and (ref == identity.conditional_url or (doc and ref == f"Patient/{doc.get('id')}")):
        return True
    return identifier_key(other.get("identifier", {})) == (identity.system, identity.value)


def is_swapped_repeat(survivor_doc: Mapping[str, Any] | None, merged_doc: Mapping[str, Any] | None,
                      plan: MergePlan) -> bool:
    """True when an earlier A40 went the other way: this survivor was already replaced by this merged
    Patient (or the merged one already replaces it). Applying it would make each replace the other."""
    back = any(link.get("type") == "replaced-by" and _points_to(link, merged_doc, plan.merged)
               for link in (survivor_doc or {}).get("link", []))
    forth = any(link.get("type") == "replaces" and _points_to(link, survivor_doc, plan.survivor.identity)
                for link in (merged_doc or {}).get("link", []))
    return back or forth
