"""ITI-18 FindDocuments (pacsflow.tasks.xdsi.query and XdsRegistryClient): the request as ITI TF-2a
3.18 wants it, a sample AdhocQueryResponse read into entries, and the client's answers and errors
over httpx's MockTransport."""

from __future__ import annotations

import httpx
import pytest
from lxml import etree

from pacsflow.tasks.core.errors import XdsConfigurationError, XdsRegistryError, XdsUnavailable
from pacsflow.tasks.xdsi import ebxml, mtom, query
from pacsflow.tasks.xdsi.client import QUERY_ACTION, XdsRegistryClient
from tests.unit.test_xdsi_client import Peer, _fault, _registry_response, _soap

URL = "http://registry.test:8080/services/xds-iti18"
OID = "1.2.826.0.1.3680043.10.1234.2"
PATIENT = ebxml.cx_patient_id("PSEUDO&O'NE", OID)  # an & escaped in the CX, a ' doubled in the literal
STUDY = "1.2.826.0.1.3680043.10.1234.99.1"
SAMPLE = f"""<query:AdhocQueryResponse xmlns:query="urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
    xmlns:rim="urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
    status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success">
  <rim:RegistryObjectList>
    <rim:ExtrinsicObject id="urn:uuid:00000000-0000-4000-8000-000000000001" mimeType="application/dicom"
        objectType="urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
        status="urn:oasis:names:tc:ebxml-regrep:StatusType:Approved">
      <rim:Slot name="urn:ihe:iti:xds:2013:referenceIdList"><rim:ValueList>
        <rim:Value>ACC\\T\\1^^^&amp;2.25.42&amp;ISO^urn:ihe:iti:xds:2013:accession</rim:Value>
        <rim:Value>{STUDY}^^^^urn:ihe:iti:xds:2016:studyInstanceUID</rim:Value>
      </rim:ValueList></rim:Slot>
      <rim:Classification classificationScheme="urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
          classifiedObject="urn:uuid:00000000-0000-4000-8000-000000000001" id="urn:uuid:c1"
          nodeRepresentation="1.2.840.10008.5.1.4.1.1.88.59"/>
      <rim:ExternalIdentifier identificationScheme="urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
          id="urn:uuid:e1" registryObject="urn:uuid:00000000-0000-4000-8000-000000000001" value="2.25.1001"/>
    </rim:ExtrinsicObject>
    <rim:ExtrinsicObject id="urn:uuid:00000000-0000-4000-8000-000000000002" mimeType="application/dicom"
        objectType="urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
        status="urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated">
      <rim:ExternalIdentifier identificationScheme="urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
          id="urn:uuid:e2" registryObject="urn:uuid:00000000-0000-4000-8000-000000000002" value="2.25.1000"/>
    </rim:ExtrinsicObject>
  </rim:RegistryObjectList>
</query:AdhocQueryResponse>"""
ENTRIES = [query.RegistryEntry("urn:uuid:00000000-0000-4000-8000-000000000001", "2.25.1001", "Approved",
                               "1.2.840.10008.5.1.4.1.1.88.59", STUDY),
           query.RegistryEntry("urn:uuid:00000000-0000-4000-8000-000000000002", "2.25.1000", "Deprecated", None, None)]
NS = {"query": query.QUERY, "rim": ebxml.RIM}


def _slots(request: etree._Element) -> dict[str, list[str]]:
    return {slot.get("name"): slot.xpath("rim:ValueList/rim:Value/text()", namespaces=NS)
            for slot in request.iterfind(f"{{{ebxml.RIM}}}AdhocQuery/{{{ebxml.RIM}}}Slot")}


def test_find_documents_asks_for_the_patients_approved_and_deprecated_entries_as_leaf_class():
    request = query.find_documents(PATIENT)
    assert request.tag == f"{{{query.QUERY}}}AdhocQueryRequest"
    [option] = request.findall(f"{{{query.QUERY}}}ResponseOption")
    assert (option.get("returnType"), option.get("returnComposedObjects")) == ("LeafClass", "true")
    [adhoc] = request.findall(f"{{{ebxml.RIM}}}AdhocQuery")
    assert adhoc.get("id") == "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"
    assert _slots(request) == {
        "$XDSDocumentEntryPatientId": [f"'PSEUDO\\T\\O''NE^^^&{OID}&ISO'"],
        "$XDSDocumentEntryStatus": ["('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved',"
                                    "'urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated')"]}


def test_a_response_is_read_into_entries_with_their_status_format_and_study():
    assert query.document_entries(etree.fromstring(SAMPLE)) == ENTRIES


def test_the_client_sends_plain_soap_12_and_reads_the_entries():
    peer = Peer(_soap(etree.fromstring(SAMPLE)))
    with XdsRegistryClient(URL, transport=httpx.MockTransport(peer)) as client:
        assert client.find_documents(PATIENT) == ENTRIES
    [sent] = peer.requests
    assert sent.headers["Content-Type"].startswith("application/soap+xml")
    assert f'action="{QUERY_ACTION}"' in sent.headers["Content-Type"]
    package = mtom.unpackage(sent.headers["Content-Type"], sent.content)
    assert package.envelope.findtext(f"{{{mtom.SOAP12}}}Header/{{{mtom.WSA}}}Action") == QUERY_ACTION
    assert package.envelope.findtext(f"{{{mtom.SOAP12}}}Header/{{{mtom.WSA}}}To") == URL
    assert _slots(package.body)["$XDSDocumentEntryPatientId"] == [query.quoted(PATIENT)]


def test_an_mtom_answer_is_read_too():
    content_type, chunks = mtom.package(mtom.envelope("urn:ihe:iti:2007:RegistryStoredQueryResponse",
                                                      etree.fromstring(SAMPLE)), [], action="x")
    peer = Peer(httpx.Response(200, content=b"".join(chunks), headers={"Content-Type": content_type}))
    with XdsRegistryClient(URL, transport=httpx.MockTransport(peer)) as client:
        assert client.find_documents(PATIENT) == ENTRIES


def test_a_registry_error_names_the_code_and_not_the_patient():
    failure = etree.fromstring(SAMPLE)
    failure.set("status", "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure")
    failure.remove(failure[0])
    failure.append(_registry_response("Failure", ("XDSUnknownPatientId", "Error", f"unknown {PATIENT}"))[0])
    with XdsRegistryClient(URL, transport=httpx.MockTransport(Peer(_soap(failure)))) as client:
        with pytest.raises(XdsRegistryError, match="ITI-18.*XDSUnknownPatientId") as caught:
            client.find_documents(PATIENT)
    assert caught.value.code == "XDSUnknownPatientId"
    assert "PSEUDO" not in str(caught.value)


def test_a_soap_fault_is_a_registry_error_and_a_registry_response_a_wrong_url():
    with XdsRegistryClient(URL, transport=httpx.MockTransport(Peer(_fault("no such query")))) as client:
        with pytest.raises(XdsRegistryError, match="SOAP Fault.*xdsi.registry_url"):
            client.find_documents(PATIENT)
    wrong = Peer(_soap(_registry_response("Success")))
    with XdsRegistryClient(URL, transport=httpx.MockTransport(wrong)) as client:
        with pytest.raises(XdsConfigurationError, match="not an AdhocQueryResponse.*xdsi.registry_url"):
            client.find_documents(PATIENT)


def test_no_answer_is_retried_then_unavailable():
    peer = Peer(*[httpx.ConnectError("refused")] * 3)
    with XdsRegistryClient(URL, transport=httpx.MockTransport(peer), max_retries=2, sleep=lambda _s: None) as client:
        with pytest.raises(XdsUnavailable, match=r"ITI-18.*after 3 attempts.*xdsi.registry_url.*registry is up"):
            client.find_documents(PATIENT)
    assert len(peer.requests) == 3


def test_from_settings_needs_the_registry_url():
    from pacsflow.tasks.settings import XdsiSettings

    with pytest.raises(XdsConfigurationError, match="xdsi.registry_url is not set"):
        XdsRegistryClient.from_settings(XdsiSettings())
