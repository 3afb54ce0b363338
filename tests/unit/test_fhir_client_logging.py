"""The FHIR client never lets httpx log an identifier carried in a URL's query."""

from __future__ import annotations

import logging

import httpx

from pacsflow.tasks.fhir.client import FhirClient

SECRET = "MRN-4711-Doe"


def test_httpx_request_log_keeps_the_path_and_drops_the_query(caplog):
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(201, headers={"Location": "http://fhir.test/fhir/Patient/1/_history/1"})

    caplog.set_level(logging.INFO, logger="httpx")
    with FhirClient("http://fhir.test/fhir", transport=httpx.MockTransport(handler)) as client:
        resp = client.put(f"Patient?identifier=urn:test|{SECRET}", {"resourceType": "Patient"})
    assert resp.status_code == 201
    assert SECRET in seen[0], "the request itself still carries the identifier"
    lines = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert lines, "httpx logged the request"
    assert all(SECRET not in line for line in lines)
    assert any("/fhir/Patient?<query redacted>" in line and "201" in line for line in lines)
