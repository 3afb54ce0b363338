"""The HL7 facade end to end: `pacsflow hl7 listen` (a subprocess), python-hl7's `mllp_send` as the
sender, and the real HAPI FHIR server (session fixture). Each test uses its own identifier system,
so tests share the server without seeing each other's Patients."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pacsflow.tasks.deid.deidentifier import patient_pseudonym
from pacsflow.tasks.fhir.client import FhirClient, errors_in
from pacsflow.tasks.fhir.mapping import MappingOptions, build_study, patient_identity
from pacsflow.tasks.fhir.sync import send_studies
from pacsflow.tasks.hl7.inbox import Inbox, InboxState
from tests.helpers import free_port
from tests.integration.conftest import hapi  # noqa: F401  (session fixture)

BIN = Path(sys.executable).parent


def adt(event: str, control_id: str, pid: str, *, charset: str = "", extra: str = "", structure: str = "ADT_A01",
        when: str = "20261130080000") -> str:
    msh18 = f"||||||{charset}" if charset else ""
    return (f"MSH|^~\\&|HIS|HOSP|PACSFLOW|RAD|{when}||ADT^{event}^{structure}|{control_id}|P|2.5.1{msh18}\r"
            f"EVN|{event}|{when}\r{pid}\r{extra}")


class Facade:
    """One `pacsflow hl7 listen` process and a way to send to it."""

    def __init__(self, tmp: Path, system: str, fhir_url: str) -> None:
        self.tmp, self.port = tmp, free_port()
        self.env = {**os.environ, "PACSFLOW_STATE_ROOT": str(tmp / "state"), "PACSFLOW_HL7__PORT": str(self.port),
                    "PACSFLOW_HL7__IDENTIFIER_SYSTEMS": f'{{"HOSP": "{system}"}}',
                    "PACSFLOW_HL7__APPLY_BACKOFF_S": "0.2", "PACSFLOW_HL7__APPLY_MAX_DELAY_S": "0.5",
                    "PACSFLOW_HL7__APPLY_RETRIES": "100", "PACSFLOW_FHIR__MAX_RETRIES": "0",
                    "PACSFLOW_FHIR__TIMEOUT_S": "120", "PACSFLOW_FHIR__BASE_URL": fhir_url}
        self.env.pop("PACSFLOW_CONFIG", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.sent = 0

    def start(self, fhir_url: str | None = None) -> None:
        if fhir_url:
            self.env["PACSFLOW_FHIR__BASE_URL"] = fhir_url
        self.proc = subprocess.Popen([str(BIN / "pacsflow"), "hl7", "listen"], env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{self.port}"],
                              capture_output=True).returncode == 0:
                return
            assert self.proc.poll() is None, self.proc.communicate()[0].decode()
            time.sleep(0.2)
        raise AssertionError("pacsflow hl7 listen did not listen")

    def send(self, *messages: str, encoding: str = "ascii") -> list[str]:
        """Send with `mllp_send`; returns MSA-1 of each ACK and keeps the ACKs."""
        self.sent += 1
        path = self.tmp / f"batch{self.sent}.hl7"
        path.write_bytes(b"".join(b"\x0b" + m.encode(encoding) + b"\x1c\r" for m in messages))
        done = subprocess.run([str(BIN / "mllp_send"), "--port", str(self.port), "--file", str(path), "127.0.0.1"],
                              capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()
        self.acks = [a for a in done.stdout.decode("latin-1").replace("\r", "\n").split("MSH|")[1:]]
        return [a.split("MSA|")[1].split("|")[0] for a in self.acks]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(60)
        self.proc.stdout.close() if self.proc.stdout else None
        return code

    def inbox(self) -> Inbox:
        return Inbox(self.tmp / "state" / "hl7" / "inbox.sqlite")


@pytest.fixture
def fhir(hapi) -> Iterator[FhirClient]:  # noqa: F811
    with FhirClient(hapi.base_url, timeout_s=120, max_retries=2, backoff_s=0.05) as client:
        yield client


def _system() -> str:
    return f"urn:oid:1.2.826.0.1.{uuid.uuid4().int % 10**12}"


def _patient(fhir: FhirClient, system: str, value: str, timeout: float = 60.0,
             until: Any = lambda p: True) -> dict[str, Any]:
    """The Patient with this identifier once ``until`` holds for it (the drain is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        found = fhir.search_by_identifier("Patient", [f"{system}|{value}"])
        if len(found) == 1 and until(found[0]):
            return found[0]
        assert len(found) <= 1, f"{len(found)} Patients for one identifier"
        if time.monotonic() > deadline:
            raise AssertionError(f"Patient {value} not as expected: {found}")
        time.sleep(0.3)


def test_adt_feed_becomes_patients_field_by_field(hapi, fhir, tmp_path):  # noqa: F811
    system = _system()
    facade = Facade(tmp_path, system, hapi.base_url)
    facade.start()
    try:
        a01 = adt("A01", "M1", "PID|1||1001^^^HOSP^MR||Muster^Hans^Peter||19700215|M|||Bahnhofstr. 1^^Bern^^3011^CH^H"
                  "||^PRN^PH^^^^^^^^^+41 31 111 11 11|||M")
        a08 = adt("A08", "M2", "PID|1||1001^^^HOSP^MR||||||||||^PRN^PH^^^^^^^^^+41 31 222 22 22", when="20261130090000")
        latin = adt("A01", "M3", "PID|1||1002^^^HOSP^MR||Müller^Zoë||19851231|F", charset="8859/1")
        assert facade.send(a01, a08) == ["AA", "AA"]
        assert facade.send(latin, encoding="latin-1") == ["AA"]
        hans = _patient(fhir, system, "1001", until=lambda p: "222 22" in str(p.get("telecom")))
        assert hans["name"] == [{"family": "Muster", "given": ["Hans", "Peter"]}]
        assert (hans["birthDate"], hans["gender"]) == ("1970-02-15", "male")
        assert hans["address"] == [{"line": ["Bahnhofstr. 1"], "city": "Bern", "postalCode": "3011",
                                    "country": "CH", "use": "home"}]
        assert hans["telecom"] == [{"system": "phone", "value": "+41 31 222 22 22", "use": "home"}]
        assert hans["maritalStatus"]["coding"][0]["code"] == "M"
        assert hans["meta"]["versionId"] == "2"  # created by the A01, updated once by the sparse A08
        zoe = _patient(fhir, system, "1002")
        assert zoe["name"] == [{"family": "Müller", "given": ["Zoë"]}]

        # A repeated control id: AA, and no second write.
        assert facade.send(a08) == ["AA"]
        a40 = adt("A40", "M4", "PID|1||1001^^^HOSP^MR", extra="MRG|1002^^^HOSP^MR\r", structure="ADT_A39")
        assert facade.send(a40) == ["AA"]
        zoe = _patient(fhir, system, "1002", until=lambda p: p.get("active") is False)
        hans = _patient(fhir, system, "1001", until=lambda p: "link" in p)
        assert hans["meta"]["versionId"] == "3"
        assert [(link["type"], link["other"]["reference"]) for link in hans["link"]] == [
            ("replaces", f"Patient/{zoe['id']}")]
        assert [(link["type"], link["other"]["reference"]) for link in zoe["link"]] == [
            ("replaced-by", f"Patient/{hans['id']}")]
        for patient in (hans, zoe):
            assert errors_in(fhir.validate(patient)) == []

        # The same A40 with the identifiers swapped: acknowledged (stored), then refused for good.
        swapped = adt("A40", "M5", "PID|1||1002^^^HOSP^MR", extra="MRG|1001^^^HOSP^MR\r", structure="ADT_A39")
        assert facade.send(swapped) == ["AA"]
        inbox = facade.inbox()
        deadline = time.monotonic() + 30
        while (row := inbox.get("M5")) is not None and row.state is InboxState.PENDING:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert row is not None and row.state is InboxState.FAILED and "swapped" in (row.reason or "")
        assert _patient(fhir, system, "1001")["meta"]["versionId"] == "3"

        # A malformed message: AE with ERR naming the field; nothing stored.
        assert facade.send(adt("A08", "M6", "PID|1||^^^HOSP^MR||Nobody")) == ["AE"]
        assert "ERR|" in facade.acks[0] and "PID^1^3" in facade.acks[0]
        assert inbox.get("M6") is None

        # An A08 (09:00) before its A01 (08:00): the patient is made by the A08; the older A01 only
        # adds what the A08 did not say (birth date, sex), the A08's newer name and phone stand.
        late_a01 = adt("A01", "M8", "PID|1||1003^^^HOSP^MR||Spät^Anna||19990101|F|||||^PRN^PH^^^^^^^^^+41 31 444 44 44",
                       charset="UNICODE UTF-8")
        early_a08 = adt("A08", "M7", "PID|1||1003^^^HOSP^MR||Spät-Neu^Anna||||||||^PRN^PH^^^^^^^^^+41 31 333 33 33",
                        charset="UNICODE UTF-8", when="20261130090000")
        assert facade.send(early_a08, late_a01, encoding="utf-8") == ["AA", "AA"]
        anna = _patient(fhir, system, "1003", until=lambda p: "birthDate" in p)
        assert anna["name"] == [{"family": "Spät-Neu", "given": ["Anna"]}]
        assert anna["telecom"] == [{"system": "phone", "value": "+41 31 333 33 33", "use": "home"}]
        assert (anna["birthDate"], anna["gender"]) == ("1999-01-01", "female")
        assert facade.stop() == 0
    finally:
        if facade.proc and facade.proc.poll() is None:
            facade.stop(signal.SIGKILL)
    assert {m.control_id: m.state for m in inbox.messages()} == {
        "M1": InboxState.APPLIED, "M2": InboxState.APPLIED, "M3": InboxState.APPLIED, "M4": InboxState.APPLIED,
        "M5": InboxState.FAILED, "M7": InboxState.APPLIED, "M8": InboxState.APPLIED}


def test_fhir_down_then_kill_9_then_applied_after_restart(hapi, fhir, tmp_path):  # noqa: F811
    system = _system()
    closed = f"http://127.0.0.1:{free_port()}/fhir"
    facade = Facade(tmp_path, system, closed)
    facade.start()
    try:
        assert facade.send(adt("A04", "K1", "PID|1||2001^^^HOSP^MR||Kill^Nine||20000101|U")) == ["AA"]
        inbox = facade.inbox()
        deadline = time.monotonic() + 30
        while (row := inbox.get("K1")) is not None and row.attempts == 0:  # the drain tried and failed
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert row is not None and row.state is InboxState.PENDING
    finally:
        assert facade.stop(signal.SIGKILL) == -signal.SIGKILL
    assert fhir.search_by_identifier("Patient", [f"{system}|2001"]) == []
    facade.start(hapi.base_url)  # the server is back; the killed listener's inbox is still there
    try:
        patient = _patient(fhir, system, "2001")
        assert patient["name"] == [{"family": "Kill", "given": ["Nine"]}] and patient["gender"] == "unknown"
        deadline = time.monotonic() + 10
        while (row := inbox.get("K1")) is not None and row.state is not InboxState.APPLIED:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        assert facade.stop() == 0


def _research_facade(tmp_path: Path, fhir_url: str) -> tuple[Facade, str, str]:
    """A research-mode facade (not started), its de-identification key and pseudonym system."""
    key = "research-key-0123456789abcdef"
    system = f"urn:pacsflow:pseudonym:{uuid.uuid4().hex[:8]}"
    facade = Facade(tmp_path, _system(), fhir_url)
    facade.env.update({"PACSFLOW_HL7__MODE": "research", "PACSFLOW_HL7__RESEARCH_AUTHORITY": "HOSP",
                       "PACSFLOW_DEID_KEY": key, "PACSFLOW_FHIR__PSEUDONYM_SYSTEM": system})
    return facade, key, system


def test_research_mode_shares_the_imaging_syncs_patient(hapi, fhir, tmp_path):  # noqa: F811
    facade, key, system = _research_facade(tmp_path, hapi.base_url)
    pseudo = patient_pseudonym(key.encode(), "3001")
    identity = patient_identity(system, pseudo)
    # The imaging sync first: its Patient (pseudonym, sex) and an ImagingStudy pointing at it.
    study = build_study({"study_uid": f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**9}",
                         "patient_pseudo_id": pseudo, "patient_sex": "F"}, [], [],
                        MappingOptions(pseudonym_system=system))
    assert send_studies(fhir, [study]).failed == []
    facade.start()
    try:
        assert facade.send(adt("A01", "R1", "PID|1||3001^^^HOSP^MR~555^^^OTHER||Secret^Name||19800704|F|||"
                               "Street 1^^Town||^PRN^PH^^^^^^^^^+41 1|||||||||||||||||Y")) == ["AA"]
        patient = _patient(fhir, system, pseudo, until=lambda p: "birthDate" in p)
    finally:
        assert facade.stop() == 0
    assert patient["id"] == identity.resource_id  # one resource: the imaging sync's
    assert {k: patient[k] for k in ("identifier", "gender", "birthDate", "deceasedBoolean")} == {
        "identifier": [{"system": system, "value": pseudo}], "gender": "female", "birthDate": "1980",
        "deceasedBoolean": True}
    assert not {"name", "address", "telecom"} & patient.keys()
    assert [s["code"] for s in patient["meta"]["security"]] == ["PSEUDED"]
    assert errors_in(fhir.validate(patient)) == []
    [imaging] = fhir.search_by_identifier("ImagingStudy", [study.study_identity.token])
    assert imaging["subject"]["reference"] == f"Patient/{patient['id']}"


def test_research_mode_adt_first_then_the_imaging_sync_keeps_the_adts_data(hapi, fhir, tmp_path):  # noqa: F811
    facade, key, system = _research_facade(tmp_path, hapi.base_url)
    survivor, merged = (patient_identity(system, patient_pseudonym(key.encode(), v)) for v in ("4001", "4002"))
    facade.start()
    try:  # no sex in the ADT: the imaging brings it
        assert facade.send(adt("A01", "F1", "PID|1||4001^^^HOSP^MR||Secret^Name||19800704" + "|" * 23 + "Y"),
                           adt("A01", "F2", "PID|1||4002^^^HOSP^MR||Other^Name||19810101"),
                           adt("A40", "F3", "PID|1||4001^^^HOSP^MR", extra="MRG|4002^^^HOSP^MR\r",
                               structure="ADT_A39")) == ["AA", "AA", "AA"]
        _patient(fhir, system, merged.value, until=lambda p: p.get("active") is False)
        before = _patient(fhir, system, survivor.value, until=lambda p: "link" in p)
    finally:
        assert facade.stop() == 0
    studies = [build_study({"study_uid": f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**9}",
                            "patient_pseudo_id": ident.value, "patient_sex": "F"}, [], [],
                           MappingOptions(pseudonym_system=system)) for ident in (survivor, merged)]
    assert send_studies(fhir, studies).failed == []
    assert send_studies(fhir, studies).failed == []  # a replay: nothing of the Patients changes
    link = {"replaces": f"Patient/{merged.resource_id}", "replaced-by": f"Patient/{survivor.resource_id}"}
    for ident, birth, kind, extra in ((survivor, "1980", "replaces", {"deceasedBoolean": True}),
                                      (merged, "1981", "replaced-by", {"active": False})):
        [patient] = fhir.search_by_identifier("Patient", [ident.token])
        assert patient["id"] == ident.resource_id
        assert patient["identifier"] == [{"system": system, "value": ident.value}]
        assert (patient["gender"], patient["birthDate"]) == ("female", birth)  # the imaging's, the ADT's
        assert {k: patient[k] for k in extra} == extra
        assert [(x["type"], x["other"]["reference"]) for x in patient["link"]] == [(kind, link[kind])]
        assert [s["code"] for s in patient["meta"]["security"]] == ["PSEUDED"]
        assert not {"name", "address", "telecom"} & patient.keys()
        assert errors_in(fhir.validate(patient)) == []
        [imaging] = fhir.search_by_identifier("ImagingStudy", [studies[0 if ident is survivor else 1]
                                                               .study_identity.token])
        assert imaging["subject"]["reference"] == f"Patient/{ident.resource_id}"
    [patient] = fhir.search_by_identifier("Patient", [survivor.token])
    assert patient["meta"]["versionId"] == str(int(before["meta"]["versionId"]) + 1)  # the sex; the replay none
