"""Catalog rows of one study → FHIR R4 ``ImagingStudy`` + ``Patient`` (+ ``Endpoint``): pure functions.

No Prefect, no sockets. The input is what the catalog holds (de-identified header metadata, one
``studies`` row, its ``series`` rows and its ``instances`` rows as DuckDB's ``to_pylist()`` gives
them), so a FHIR sync can be replayed at any time without retrieving or de-identifying again.

The models are ``fhir.resources.R4B`` (R4B matches R4 for ImagingStudy, Patient and Endpoint);
building them validates every element, and a study that does not validate raises
:class:`pacsflow.tasks.core.errors.FhirMappingError` naming the element (never its value).

Mapping (DICOM PS3.17 / FHIR R4 ImagingStudy page, "Mappings for DICOM"):

================================  ===========================================================
ImagingStudy                      catalog (DICOM attribute)
================================  ===========================================================
identifier                        ``urn:dicom:uid`` | ``urn:oid:`` + study_uid (StudyInstanceUID)
status                            ``available`` (the study is in the lake)
subject                           the Patient below
started                           study_date + study_time (StudyDate, StudyTime); with a time
                                  only when ``timezone`` is known (FHIR requires an offset)
numberOfSeries / numberOfInstances  number_of_series / number_of_instances (what we cataloged)
modality                          modalities (ModalitiesInStudy), DICOM DCM code system
description                       study_description (StudyDescription), when kept by de-id
procedureCode                     ``procedure_codes`` when the row carries them (ProcedureCodeSequence)
endpoint, series[].endpoint       one Endpoint (``dicom-wado-rs``) when ``wado_rs_base_url`` is set
series[].uid/number/modality      series_uid, series_number, modality
series[].description              series_description
series[].numberOfInstances        number_of_instances
series[].bodySite                 body_part_examined → SNOMED CT via PS3.16 Annex L
                                  (``tasks/fhir/data/bodypart_snomed.json``)
series[].laterality               laterality (Laterality, else ImageLaterality) → SNOMED CT
                                  (R4 value set bodysite-laterality)
series[].started                  series_date + series_time
series[].instance[].uid/number    sop_instance_uid, instance_number
series[].instance[].sopClass      ``urn:ietf:rfc:3986`` | ``urn:oid:`` + sop_class_uid
series[].instance[].title         image_type values joined by ``\\`` (ImageType, the last
                                  alternative of the FHIR mapping for title)
================================  ===========================================================

Patient: ``identifier`` = {pseudonym_system, patient_pseudo_id}; ``gender`` from patient_sex when
the de-identification kept it. No name and no birth date unless ``identified`` is set (clinical
deployments whose rows carry ``patient_name`` / ``patient_birth_date``).
A Patient the server already holds is merged into (:func:`merge_patient`), not replaced: the sync
owns only the elements above; what others wrote (the HL7 facade's birth year, links, ``active``) stays.

Resource ids are derived from the identifiers (SHA-256), so every replay addresses the same
resources; :func:`content_hash` lets the sync skip studies whose resources did not change.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources as _resources
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.patient import Patient
from pydantic import ValidationError

from pacsflow.tasks.core.errors import FhirMappingError

#: Bump when the mapping changes on purpose: every study's hash changes, so the next sync re-sends all.
MAPPING_VERSION = "pacsflow-fhir-map-1"

DICOM_UID_SYSTEM = "urn:dicom:uid"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED_SYSTEM = "http://snomed.info/sct"
URI_SYSTEM = "urn:ietf:rfc:3986"
ENDPOINT_CONNECTION_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
ENDPOINT_PAYLOAD_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type"
#: HL7 v3 ObservationValue "PSEUDED" (pseudonymized): a security label on de-identified resources.
SECURITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"

BODYPART_RESOURCE = "bodypart_snomed.json"

# DICOM Laterality / ImageLaterality → R4 value set http://hl7.org/fhir/ValueSet/bodysite-laterality.
# "U" (unpaired) has no code there: no laterality.
_LATERALITY = {
    "L": ("419161000", "Unilateral left"),
    "R": ("419465000", "Unilateral right"),
    "B": ("51440002", "Bilateral"),
}
_GENDER = {"M": "male", "F": "female", "O": "other"}
# Coding Scheme Designator → FHIR system for procedure codes (PS3.16 Table 8-1 and FHIR's DICOM page).
_CODING_SCHEMES = {
    "SCT": SNOMED_SYSTEM,
    "SRT": "http://snomed.info/srt",
    "LN": "http://loinc.org",
    "DCM": DCM_SYSTEM,
    "RADLEX": "http://www.radlex.org",
    "RADLEX_PLAYBOOK": "http://www.radlex.org",
    "RPID": "http://www.radlex.org",
}

# FHIR choice elements: setting one variant must drop the others.
_CHOICES = {"deceasedBoolean": "deceased", "deceasedDateTime": "deceased",
            "multipleBirthBoolean": "multipleBirth", "multipleBirthInteger": "multipleBirth"}
# Elements the server keeps for itself: not compared when deciding whether a write changes anything.
_SERVER_OWNED = ("meta", "text")

_NS = uuid.UUID("6a0f3c1e-5d3b-5b8e-9a57-7061637366c1")  # pacsflow's namespace for urn:uuid fullUrls


@dataclass(frozen=True)
class MappingOptions:
    """What the mapping needs from the settings (``Settings.fhir``)."""

    pseudonym_system: str = "urn:pacsflow:pseudonym"
    wado_rs_base_url: str | None = None
    identified: bool = False
    timezone: str | None = None

    @classmethod
    def from_settings(cls, fhir: Any) -> MappingOptions:
        return cls(
            pseudonym_system=fhir.pseudonym_system,
            wado_rs_base_url=fhir.wado_rs_base_url,
            identified=fhir.identified_sync,
            timezone=fhir.study_timezone,
        )


@dataclass(frozen=True)
class Identity:
    """A business identity: the identifier that conditional updates and searches use."""

    resource_type: str
    system: str
    value: str

    @property
    def token(self) -> str:
        return f"{self.system}|{self.value}"

    @property
    def conditional_url(self) -> str:
        """``Type?identifier=system|value``, percent-encoded where needed (HAPI decodes it)."""
        return (f"{self.resource_type}?identifier={quote(self.system, safe=':/')}|"
                f"{quote(self.value, safe=':/.-_~')}")

    @property
    def full_url(self) -> str:
        """A stable ``urn:uuid:`` for this identity's entry in a transaction Bundle."""
        return f"urn:uuid:{uuid.uuid5(_NS, self.resource_type + '|' + self.token)}"

    @property
    def resource_id(self) -> str:
        """The resource id we give it: a prefix and 128 bits of SHA-256 of the identifier."""
        digest = hashlib.sha256(self.token.encode("utf-8")).hexdigest()[:32]
        prefix = {"Patient": "pfp", "ImagingStudy": "pfs", "Endpoint": "pfe"}.get(self.resource_type, "pf")
        return f"{prefix}-{digest}"


def study_identity(study_uid: str) -> Identity:
    return Identity("ImagingStudy", DICOM_UID_SYSTEM, f"urn:oid:{study_uid}")


def patient_identity(pseudonym_system: str, patient_id: str) -> Identity:
    return Identity("Patient", pseudonym_system, patient_id)


def endpoint_identity(base_url: str) -> Identity:
    return Identity("Endpoint", URI_SYSTEM, base_url)


@dataclass(frozen=True)
class StudyResources:
    """The validated resources of one study, with their identities and content hash."""

    study_uid: str
    imaging_study: ImagingStudy
    patient: Patient
    endpoint: Endpoint | None
    study_identity: Identity
    patient_identity: Identity
    endpoint_identity: Identity | None
    number_of_series: int
    number_of_instances: int
    hash: str
    #: The resources as FHIR JSON, exactly as validated (for the hash and every Bundle).
    patient_json: dict[str, Any] = field(default_factory=dict, repr=False)
    endpoint_json: dict[str, Any] | None = field(default=None, repr=False)
    study_json: dict[str, Any] = field(default_factory=dict, repr=False)

    def resources(self) -> list[Any]:
        return [r for r in (self.patient, self.endpoint, self.imaging_study) if r is not None]


# -- body part table ----------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def bodypart_table() -> dict[str, dict[str, str]]:
    """BodyPartExamined defined term → {"code", "display"} (SNOMED CT), from PS3.16 Annex L Table L-1."""
    with _resources.files("pacsflow.tasks.fhir").joinpath("data", BODYPART_RESOURCE).open("r", encoding="utf-8") as fh:
        doc = json.load(fh)
    return {k.upper(): dict(v) for k, v in doc["terms"].items()}


def body_site(body_part: str | None) -> dict[str, str] | None:
    """The SNOMED CT Coding (as a dict) for a BodyPartExamined value, or None when not in the table."""
    if not body_part:
        return None
    entry = bodypart_table().get(body_part.strip().upper())
    if entry is None:
        return None
    return {"system": SNOMED_SYSTEM, "code": entry["code"], "display": entry["display"]}


def laterality(value: str | None) -> dict[str, str] | None:
    if not value:
        return None
    entry = _LATERALITY.get(value.strip().upper())
    return None if entry is None else {"system": SNOMED_SYSTEM, "code": entry[0], "display": entry[1]}


# -- dates and times ----------------------------------------------------------------------------------
def _as_date(value: Any) -> dt.date | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    text = str(value).strip().replace("-", "")
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _as_time(text: Any) -> dt.time | None:
    """DICOM TM (``HHMMSS.FFFFFF``, possibly truncated; also the old ``HH:MM:SS``) → time."""
    if not text:
        return None
    raw = str(text).strip().replace(":", "")
    whole, _, frac = raw.partition(".")
    if not whole.isdigit() or len(whole) not in (2, 4, 6):
        return None
    try:
        hh = int(whole[0:2])
        mm = int(whole[2:4]) if len(whole) >= 4 else 0
        ss = int(whole[4:6]) if len(whole) >= 6 else 0
        us = int((frac + "000000")[:6]) if frac.isdigit() else 0
        return dt.time(hh, mm, min(ss, 59), us)  # TM allows a leap second 60
    except ValueError:
        return None


def started(date: Any, time_text: Any, timezone: str | None) -> str | None:
    """FHIR dateTime from DICOM DA + TM. A time needs an offset in FHIR, so without a time zone the
    value is the date only (still a valid dateTime)."""
    day = _as_date(date)
    if day is None:
        return None
    tm = _as_time(time_text)
    if tm is None or not timezone:
        return day.isoformat()
    return dt.datetime.combine(day, tm, tzinfo=ZoneInfo(timezone)).isoformat()


# -- building -------------------------------------------------------------------------------------
def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _procedure_codes(study: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """``procedure_codes``: a list of {code_value, coding_scheme_designator, code_meaning} (not yet a
    catalog column; used when a row carries it)."""
    items = study.get("procedure_codes") or []
    out = []
    for item in items:
        code, scheme, meaning = (_text(item.get("code_value")), _text(item.get("coding_scheme_designator")),
                                 _text(item.get("code_meaning")))
        system = _CODING_SCHEMES.get((scheme or "").upper())
        concept: dict[str, Any] = {}
        if code and system:
            concept["coding"] = [{"system": system, "code": code, **({"display": meaning} if meaning else {})}]
        if meaning:
            concept["text"] = meaning
        if concept:
            out.append(concept)
    return out or None


def _human_name(pn: Any) -> list[dict[str, Any]] | None:
    """DICOM PN (``Family^Given^Middle^Prefix^Suffix``, alphabetic group) → HumanName."""
    text = _text(pn)
    if not text:
        return None
    parts = (text.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    name: dict[str, Any] = {"use": "official"}
    if family:
        name["family"] = family
    givens = [g for g in (given, middle) if g]
    if givens:
        name["given"] = givens
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return [name] if len(name) > 1 else None


def _sort_key(number: Any, uid: str) -> tuple[int, int, str]:
    return (number is None, number if number is not None else 0, uid)


def _validation_message(kind: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:5]:
        loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]).replace(".[", "[")
        parts.append(f"{kind}.{loc}: {err['msg']}")
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def _prune(value: Any) -> Any:
    """Drop None values (and empty lists) recursively: an absent required element must be *missing*
    for the model to flag it (an explicit None passes)."""
    if isinstance(value, dict):
        return {k: _prune(v) for k, v in value.items() if v is not None and v != []}
    if isinstance(value, list):
        return [_prune(v) for v in value if v is not None]
    return value


def resource_json(resource: Any) -> dict[str, Any]:
    """The resource as FHIR JSON (a plain dict)."""
    return json.loads(resource.model_dump_json())


def _validated(model: Any, doc: dict[str, Any], study_uid: str) -> tuple[Any, dict[str, Any]]:
    """Validate ``doc`` (our FHIR JSON without resourceType) with the fhir.resources ``model``.

    Returns the model and the JSON to send: ``doc`` itself, pruned, with its resourceType. Sending
    what was validated saves serializing the model back (about half of the mapping time); a unit
    test pins that the two are the same JSON.
    """
    pruned = _prune(doc)
    kind = model.get_resource_type()
    try:
        resource = model(**pruned)
    except ValidationError as exc:
        raise FhirMappingError(f"study {study_uid}: {_validation_message(kind, exc)}; check the study's catalog "
                               "rows (pacsflow catalog query)") from None
    return resource, {"resourceType": kind, **pruned}


def content_hash(resources: Iterable[Any]) -> str:
    """SHA-256 of the canonical JSON of the resources (and :data:`MAPPING_VERSION`), hex."""
    docs = [r if isinstance(r, Mapping) else resource_json(r) for r in resources if r is not None]
    canonical = json.dumps([MAPPING_VERSION, docs], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def build_study(
    study: Mapping[str, Any],
    series: Sequence[Mapping[str, Any]],
    instances: Sequence[Mapping[str, Any]],
    options: MappingOptions,
) -> StudyResources:
    """Build and validate the resources of one study from its catalog rows.

    Raises :class:`FhirMappingError` (permanent, per study) when the rows do not make valid resources.
    """
    study_uid = _text(study.get("study_uid"))
    if not study_uid:
        raise FhirMappingError("study row without study_uid; check the catalog (catalog_root)")
    pseudo = _text(study.get("patient_pseudo_id"))
    if not pseudo:
        raise FhirMappingError(f"study {study_uid}: no patient_pseudo_id, so no Patient to reference; check the "
                               "study's catalog rows (pacsflow catalog query)")
    s_ident = study_identity(study_uid)
    p_ident = patient_identity(options.pseudonym_system, pseudo)
    e_ident = endpoint_identity(options.wado_rs_base_url) if options.wado_rs_base_url else None

    patient, patient_json = _validated(Patient, _patient_doc(study, p_ident, options), study_uid)
    endpoint, endpoint_json = None, None
    if e_ident is not None:
        endpoint, endpoint_json = _validated(Endpoint, _endpoint_doc(e_ident), study_uid)
    series_docs = _series_docs(series, instances, options.timezone, _endpoint_refs(e_ident))
    study_doc = _imaging_study_doc(study, series_docs, (s_ident, p_ident, e_ident), options)
    imaging_study, study_json = _validated(ImagingStudy, study_doc, study_uid)
    return StudyResources(
        study_uid, imaging_study, patient, endpoint, s_ident, p_ident, e_ident,
        number_of_series=int(study.get("number_of_series") or 0),
        number_of_instances=int(study.get("number_of_instances") or 0),
        hash=content_hash([patient_json, endpoint_json, study_json]),
        patient_json=patient_json, endpoint_json=endpoint_json, study_json=study_json,
    )


def _security(options: MappingOptions) -> dict[str, Any] | None:
    """``meta`` of our own resources: labelled pseudonymized, unless the sync is identified."""
    if options.identified:
        return None
    return {"security": [{"system": SECURITY_SYSTEM, "code": "PSEUDED", "display": "pseudonymized"}]}


def _patient_doc(study: Mapping[str, Any], ident: Identity, options: MappingOptions) -> dict[str, Any]:
    """The pseudonym only (and sex when the de-identification kept it); name and birth date only
    in identified mode."""
    doc: dict[str, Any] = {"identifier": [{"system": ident.system, "value": ident.value}]}
    if not options.identified:
        # Our own resource: our id. In identified mode the hospital's Patient may already exist
        # under another id, and a conditional update must not try to rename it.
        doc["id"] = ident.resource_id
        doc["meta"] = _security(options)
    gender = _GENDER.get((_text(study.get("patient_sex")) or "").upper())
    if gender:
        doc["gender"] = gender
    if options.identified:
        name = _human_name(study.get("patient_name"))
        birth = _as_date(study.get("patient_birth_date"))
        if name:
            doc["name"] = name
        if birth:
            doc["birthDate"] = birth.isoformat()
    return doc


def _endpoint_doc(ident: Identity) -> dict[str, Any]:
    return {
        "id": ident.resource_id,
        "identifier": [{"system": ident.system, "value": ident.value}],
        "status": "active",
        "connectionType": {"system": ENDPOINT_CONNECTION_SYSTEM, "code": "dicom-wado-rs"},
        "name": "pacsflow DICOMweb WADO-RS",
        "payloadType": [{"coding": [{"system": ENDPOINT_PAYLOAD_SYSTEM, "code": "any"}], "text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": ident.value,
    }


def _instance_doc(inst: Mapping[str, Any]) -> dict[str, Any]:
    sop_class = _text(inst.get("sop_class_uid"))
    image_type = inst.get("image_type") or []
    return {
        "uid": _text(inst.get("sop_instance_uid")),
        "sopClass": {"system": URI_SYSTEM, "code": f"urn:oid:{sop_class}"} if sop_class else None,
        "number": inst.get("instance_number"),
        "title": "\\".join(str(v) for v in image_type if v is not None) or None,
    }


def _endpoint_refs(e_ident: Identity | None) -> list[dict[str, str]] | None:
    return [{"reference": f"Endpoint/{e_ident.resource_id}"}] if e_ident else None


def _series_docs(series: Sequence[Mapping[str, Any]], instances: Sequence[Mapping[str, Any]],
                 timezone: str | None, endpoint: list[dict[str, str]] | None = None) -> list[dict[str, Any]]:
    """``ImagingStudy.series`` in series number order, each with its instances in instance number order
    (and the Endpoint, when there is one: a client may follow a series to its images too)."""
    by_series: dict[str, list[Mapping[str, Any]]] = {}
    for inst in instances:
        by_series.setdefault(str(inst.get("series_uid")), []).append(inst)
    docs = []
    for se in sorted(series, key=lambda r: _sort_key(r.get("series_number"), str(r.get("series_uid")))):
        se_uid = _text(se.get("series_uid"))
        modality = _text(se.get("modality"))
        members = sorted(by_series.get(str(se_uid), []),
                         key=lambda r: _sort_key(r.get("instance_number"), str(r.get("sop_instance_uid"))))
        docs.append({
            "uid": se_uid,
            "number": se.get("series_number"),
            "modality": {"system": DCM_SYSTEM, "code": modality} if modality else None,
            "description": _text(se.get("series_description")),
            "numberOfInstances": se.get("number_of_instances"),
            "bodySite": body_site(se.get("body_part_examined")),
            "laterality": laterality(se.get("laterality")),
            "started": started(se.get("series_date"), se.get("series_time"), timezone),
            "endpoint": endpoint,
            "instance": [_instance_doc(inst) for inst in members] or None,
        })
    return docs


def _imaging_study_doc(study: Mapping[str, Any], series_docs: list[dict[str, Any]],
                       identities: tuple[Identity, Identity, Identity | None],
                       options: MappingOptions) -> dict[str, Any]:
    """identities: the study's, its patient's and the endpoint's (None without WADO-RS)."""
    s_ident, p_ident, e_ident = identities
    modalities = [m for m in (study.get("modalities") or []) if m]
    return {
        "id": s_ident.resource_id,
        "meta": _security(options),
        "identifier": [{"system": s_ident.system, "value": s_ident.value}],
        "status": "available",
        "subject": {"reference": p_ident.conditional_url if options.identified
                    else f"Patient/{p_ident.resource_id}"},
        "started": started(study.get("study_date"), study.get("study_time"), options.timezone),
        "numberOfSeries": study.get("number_of_series"),
        "numberOfInstances": study.get("number_of_instances"),
        "modality": [{"system": DCM_SYSTEM, "code": m} for m in modalities] or None,
        "description": _text(study.get("study_description")),
        "procedureCode": _procedure_codes(study),
        "endpoint": _endpoint_refs(e_ident),
        "series": series_docs or None,
    }


# -- merging into what the server holds ----------------------------------------------------------------
def _union(old: list[Any], new: list[Any], key: Any, *, keep_old: bool = False) -> list[Any]:
    """Items of both lists in first-seen order; where ``key`` matches, the new one wins (the old
    one with ``keep_old``)."""
    merged = {key(item): item for item in old}
    for item in new:
        if not keep_old or key(item) not in merged:
            merged[key(item)] = item
    return list(merged.values())


def identifier_key(ident: Mapping[str, Any]) -> tuple[Any, Any]:
    return ident.get("system"), ident.get("value")


def _link_key(link: Mapping[str, Any]) -> Any:
    other = link.get("other", {})
    return other.get("reference") or repr(sorted(other.get("identifier", {}).items()))


def _has_choice(doc: Mapping[str, Any], name: str) -> bool:
    return any(variant in doc for variant, group in _CHOICES.items() if group == _CHOICES[name])


def merge_patient(existing: dict[str, Any] | None, incoming: dict[str, Any], *,
                  fill_only: bool = False) -> dict[str, Any]:
    """``existing`` updated by a sparse ``incoming``: present elements replace, absent ones stay,
    ``None`` (HL7 ``""``) removes; identifiers and links are united, security labels too.

    ``fill_only`` (what an older message may still do): only elements ``existing`` lacks are added
    (and identifiers, links, labels it lacks); nothing is replaced or removed."""
    out = dict(existing or {})
    for name, value in incoming.items():
        if fill_only and (value is None or (name in _CHOICES and _has_choice(out, name))):
            continue
        if name in _CHOICES:  # one variant of a choice replaces (or erases) every variant
            for variant, group in _CHOICES.items():
                if group == _CHOICES[name]:
                    out.pop(variant, None)
        if value is None:
            out.pop(name, None)
        elif name in ("identifier", "link"):
            key = identifier_key if name == "identifier" else _link_key
            out[name] = _union(out.get(name, []), value, key, keep_old=fill_only)
        elif name == "meta":
            security = _union(out.get("meta", {}).get("security", []), value.get("security", []),
                              lambda s: (s.get("system"), s.get("code")))
            out[name] = {**out.get("meta", {}), **value, **({"security": security} if security else {})}
        elif (name == "id" and "id" in out) or (fill_only and name in out):
            continue  # the server's id stands (conditional updates find it by identifier)
        else:
            out[name] = value
    return out


def same_content(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two versions of a resource say the same (the server's meta and narrative aside)."""
    def strip(doc: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in doc.items() if k not in _SERVER_OWNED}
    return strip(a) == strip(b)


def version_of(resource: Mapping[str, Any]) -> str:
    """``meta.versionId`` of a resource read from the server, ``""`` when it has none."""
    return str((resource.get("meta") or {}).get("versionId") or "")


def transaction_bundle(studies: Sequence[StudyResources], by_id: Collection[Identity] = (),
                       existing: Mapping[Identity, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """One ``transaction`` Bundle (FHIR JSON) with conditional updates for a batch of studies.

    Entries: ``PUT Patient?identifier=…`` and ``PUT Endpoint?identifier=…`` once per identity (a
    patient shared by several studies appears once), then ``PUT ImagingStudy?identifier=…`` per
    study whose ``subject`` and ``endpoint`` point at those entries' ``urn:uuid`` fullUrls.
    Identities in ``by_id`` are written as ``PUT Type/<our id>`` instead (to revive a resource that
    was deleted on the server: its id is taken, so a conditional create of it conflicts).

    ``existing``: Patients the server already holds (read by identifier just before). Ours is merged
    into each (:func:`merge_patient`: what another writer, e.g. an HL7 ADT message, gave it stays)
    and written with ``PUT Patient/<its id>`` and ``ifMatch`` on the version read, so a write made
    meanwhile makes the transaction fail (409/412) rather than be lost; a Patient the merge does not
    change gets no entry, the ImagingStudy points at its id.
    Raises ValueError if a study appears twice (two entries for one identity are not allowed).
    """
    entries: list[dict[str, Any]] = []
    placed: dict[Identity, str] = {}
    studies_seen: set[Identity] = set()
    existing = existing or {}

    def url(identity: Identity, doc: dict[str, Any]) -> str:
        if identity in by_id and doc.get("id"):
            return f"{identity.resource_type}/{doc['id']}"
        return identity.conditional_url

    def place(identity: Identity, doc: dict[str, Any]) -> str:
        if identity in placed:
            return placed[identity]
        request = {"method": "PUT", "url": url(identity, doc)}
        found = existing.get(identity)
        if found is not None and found.get("id"):
            doc = {**merge_patient(dict(found), doc), "id": found["id"]}
            if same_content(doc, found):
                placed[identity] = f"{identity.resource_type}/{found['id']}"
                return placed[identity]
            request = {"method": "PUT", "url": f"{identity.resource_type}/{found['id']}",
                       **({"ifMatch": f'W/"{version_of(found)}"'} if version_of(found) else {})}
        placed[identity] = identity.full_url
        entries.append({"fullUrl": identity.full_url, "resource": doc, "request": request})
        return placed[identity]

    for s in studies:
        if s.study_identity in studies_seen:
            raise ValueError(f"study {s.study_uid} appears twice in one Bundle")
        studies_seen.add(s.study_identity)
        subject = place(s.patient_identity, s.patient_json or resource_json(s.patient))
        doc = dict(s.study_json or resource_json(s.imaging_study))  # top-level keys replaced below
        doc["subject"] = {"reference": subject}
        if s.endpoint is not None and s.endpoint_identity is not None:
            endpoint_doc = s.endpoint_json or resource_json(s.endpoint)
            endpoint = [{"reference": place(s.endpoint_identity, endpoint_doc)}]
            doc["endpoint"] = endpoint
            if doc.get("series"):
                doc["series"] = [{**se, "endpoint": endpoint} for se in doc["series"]]
        entries.append({"fullUrl": s.study_identity.full_url, "resource": doc,
                        "request": {"method": "PUT", "url": url(s.study_identity, doc)}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
