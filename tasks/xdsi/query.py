"""ITI-18 Registry Stored Query for ``pacsflow xdsi check``: the FindDocuments request for one patient
(ITI TF-2a 3.18.4.1.2.3.7.1) and the DocumentEntries of its AdhocQueryResponse. Pure: no network.

Values of a stored query's parameters are SQL-like literals: a string is quoted with ``'`` (one
inside doubled), a list is ``('a','b')`` (ITI TF-2a 3.18.4.1.2.3.5).
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from pacsflow.tasks.xdsi.ebxml import DOCUMENT_ENTRY_SCHEMES, REFERENCE_ID_LIST, RIM, STUDY_UID_ID_TYPE

QUERY = "urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
FIND_DOCUMENTS = "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"
STATUS_TYPE = "urn:oasis:names:tc:ebxml-regrep:StatusType:"
APPROVED, DEPRECATED = "Approved", "Deprecated"
_HL7_UNESCAPES = (("\\F\\", "|"), ("\\S\\", "^"), ("\\T\\", "&"), ("\\R\\", "~"), ("\\E\\", "\\"))


@dataclass(frozen=True)
class RegistryEntry:
    """One DocumentEntry as the registry holds it (status without its URN prefix: Approved, Deprecated)."""

    entry_uuid: str
    unique_id: str | None
    status: str
    format_code: str | None
    study_uid: str | None  # from referenceIdList, when the entry names one


def quoted(value: str) -> str:
    """``value`` as a stored-query string literal."""
    return "'" + value.replace("'", "''") + "'"


def _slot(parent: etree._Element, name: str, value: str) -> None:
    slot = etree.SubElement(parent, f"{{{RIM}}}Slot", name=name)
    etree.SubElement(etree.SubElement(slot, f"{{{RIM}}}ValueList"), f"{{{RIM}}}Value").text = value


def find_documents(patient_cx: str, statuses: tuple[str, ...] = (APPROVED, DEPRECATED)) -> etree._Element:
    """The AdhocQueryRequest FindDocuments(``patient_cx``, ``statuses``) returning LeafClass (whole
    entries). ``patient_cx`` is :func:`.ebxml.cx_patient_id`'s."""
    request = etree.Element(f"{{{QUERY}}}AdhocQueryRequest", nsmap={"query": QUERY, "rim": RIM})
    etree.SubElement(request, f"{{{QUERY}}}ResponseOption", returnComposedObjects="true", returnType="LeafClass")
    query = etree.SubElement(request, f"{{{RIM}}}AdhocQuery", id=FIND_DOCUMENTS)
    _slot(query, "$XDSDocumentEntryPatientId", quoted(patient_cx))
    _slot(query, "$XDSDocumentEntryStatus", "(" + ",".join(quoted(STATUS_TYPE + s) for s in statuses) + ")")
    return request


def _hl7_unescape(text: str) -> str:
    for escaped, raw in _HL7_UNESCAPES:
        text = text.replace(escaped, raw)
    return text


def _study_uid(entry: etree._Element) -> str | None:
    for value in entry.iterfind(f"{{{RIM}}}Slot[@name='{REFERENCE_ID_LIST}']/{{{RIM}}}ValueList/{{{RIM}}}Value"):
        text = value.text or ""
        if text.endswith("^" + STUDY_UID_ID_TYPE):
            return _hl7_unescape(text.split("^", 1)[0])
    return None


def _entry(entry: etree._Element) -> RegistryEntry:
    unique_ids = entry.xpath("rim:ExternalIdentifier[@identificationScheme=$s]/@value", namespaces={"rim": RIM},
                             s=DOCUMENT_ENTRY_SCHEMES["uniqueId"])
    formats = entry.xpath("rim:Classification[@classificationScheme=$s]/@nodeRepresentation",
                          namespaces={"rim": RIM}, s=DOCUMENT_ENTRY_SCHEMES["formatCode"])
    return RegistryEntry(entry_uuid=entry.get("id") or "", unique_id=str(unique_ids[0]) if unique_ids else None,
                         status=(entry.get("status") or "").removeprefix(STATUS_TYPE),
                         format_code=str(formats[0]) if formats else None, study_uid=_study_uid(entry))


def document_entries(response: etree._Element) -> list[RegistryEntry]:
    """The DocumentEntries (ExtrinsicObjects) of an AdhocQueryResponse, in the order given."""
    return [_entry(e) for e in response.iterfind(f"{{{RIM}}}RegistryObjectList/{{{RIM}}}ExtrinsicObject")]
