"""Typed settings for every pacsflow run, read at run time (never at import).

Sources, highest priority first: explicit keyword arguments, environment variables
(``PACSFLOW_*``; nested fields with ``__``, e.g. ``PACSFLOW_PACS__PORT``), an optional
YAML file named by ``PACSFLOW_CONFIG``, then the defaults below, which point at the
local Orthanc that ``pacsflow stack up`` starts.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_serializer, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from pacsflow.tasks.core.files import describe_os_error
from pacsflow.tasks.core.statedb import check_url, mask_url
from pacsflow.tasks.deid.choices import DEFAULT_OPTIONS, Option, PixelPolicy, SafePrivateList, conflicting_dates

AE_TITLE_MAX = 16
DEFAULT_SOURCE = "pacs"  # the name of the PACS in ``pacs`` wherever sources are named
SOURCE_NAME = re.compile(r"[a-z0-9-]{1,16}")


class RetrieveMethod(str, enum.Enum):
    C_MOVE = "c-move"
    C_GET = "c-get"


class ReceiverEngine(str, enum.Enum):
    """What receives C-MOVE objects: DCMTK ``storescp`` (native, one process per association) or
    pynetdicom in the flow's process. ``auto`` takes DCMTK when ``storescp`` is installed and the
    receiver does not speak TLS."""

    AUTO = "auto"
    DCMTK = "dcmtk"
    PYNETDICOM = "pynetdicom"


def _check_ae_title(value: str) -> str:
    value = value.strip()
    if not value or len(value) > AE_TITLE_MAX or "\\" in value or not value.isascii():
        raise ValueError("must be 1-16 ASCII characters without backslash")
    return value


def _check_ae_titles(values: list[str]) -> list[str]:
    return [_check_ae_title(ae) for ae in values]


class PacsTlsSettings(BaseModel):
    """TLS for our associations with the PACS (DICOM PS3.15 secure transport, TLS 1.2 or later).

    Files are checked when a run starts, not here: settings load on machines that lack them.
    PACS certificates often name an AE or a host other than the one we dial, so when the name
    check fails, set ``server_name`` to the name the certificate carries; turn ``check_hostname``
    off only for a private CA that signs nothing but the PACS (the chain is verified either way)."""

    enabled: bool = Field(False, description="speak DICOM TLS with the PACS (C-ECHO, C-FIND, C-MOVE, C-GET)")
    ca_bundle: Path | None = Field(
        None, description="PEM file of the CAs that sign the PACS's certificate (default: the system's)"
    )
    client_cert: Path | None = Field(None, description="PEM certificate we present, for PACSs that require one")
    client_key: Path | None = Field(None, description="PEM private key of client_cert (when not in the same file)")
    check_hostname: bool = Field(True, description="the PACS's certificate must name server_name (or pacs.host)")
    server_name: str | None = Field(None, description="the name to expect in the PACS's certificate (default: host)")

    @model_validator(mode="after")
    def _key_needs_cert(self) -> "PacsTlsSettings":
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key is set without client_cert")
        return self


class PacsSettings(BaseModel):
    """The PACS we query and retrieve from."""

    host: str = Field("127.0.0.1", description="the PACS's host name or IP address (DICOM)")
    port: int = Field(4242, ge=1, le=65535, description="the PACS's DICOM port")
    called_ae: str = Field("ORTHANC", description="the PACS's AE title (the called AE of our associations)")
    http_url: str = Field(
        "http://127.0.0.1:8042",
        description="Orthanc's HTTP address: only the local stack uses it (the HTTP port `pacsflow stack up` "
        "gives Orthanc); runs speak DICOM only",
    )
    # PACSs cap C-FIND answers (Orthanc: LimitFindResults); discovery splits what reaches the cap.
    result_cap: int | None = Field(
        None, ge=0, description="unset = unknown (query day by day); 0 = no cap; N = answers of N are capped"
    )
    timeout_s: float = Field(60.0, gt=0, description="DICOM network, ACSE and DIMSE timeouts (seconds)")
    tls: PacsTlsSettings = PacsTlsSettings()

    _ae = field_validator("called_ae")(_check_ae_title)


class ReceiverTlsSettings(BaseModel):
    """TLS for our Storage SCP: on when ``cert`` is set, and then the only way in (one port, one
    protocol): the PACS must send to us with TLS too. With ``ca_bundle``, a peer must present a
    certificate signed by one of its CAs, unless ``require_client_cert`` is false."""

    cert: Path | None = Field(None, description="PEM certificate the receiver presents (turns TLS on)")
    key: Path | None = Field(None, description="PEM private key of cert (when not in the same file)")
    ca_bundle: Path | None = Field(None, description="PEM file of the CAs that sign the peers' client certificates")
    require_client_cert: bool | None = Field(
        None, description="refuse peers without a trusted certificate (default: true when ca_bundle is set)"
    )

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    @property
    def verifies_peers(self) -> bool:
        return self.ca_bundle is not None and self.require_client_cert is not False

    @model_validator(mode="after")
    def _consistent(self) -> "ReceiverTlsSettings":
        if self.cert is None and (self.key or self.ca_bundle or self.require_client_cert):
            raise ValueError("cert is required for the receiver's TLS (key, ca_bundle, require_client_cert)")
        if self.require_client_cert and self.ca_bundle is None:
            raise ValueError("require_client_cert needs ca_bundle (the CAs that sign the peers' certificates)")
        return self


class ReceiverSettings(BaseModel):
    """Our own Storage SCP that C-MOVE sends to (registered as a modality at the PACS)."""

    ae_title: str = Field("PACSFLOW", description="our Storage SCP's AE title: the PACS must know it as a C-MOVE "
                          "destination with receiver.host and receiver.port")
    host: str = Field("127.0.0.1", description="the address our Storage SCP listens on (and the PACS sends to)")
    port: int = Field(11113, ge=1, le=65535, description="the port our Storage SCP listens on")
    allowed_aes: list[str] = Field(
        default_factory=list,
        description="calling AE titles that may send to the receiver besides the PACS's own (pacs.called_ae)",
    )
    max_object_mb: int = Field(2048, ge=1, description="a received object larger than this is refused, never staged")
    engine: ReceiverEngine = Field(
        ReceiverEngine.AUTO,
        description="auto (dcmtk when storescp is installed and tls is off) | dcmtk (storescp per association, "
        "checked at the staging boundary) | pynetdicom (in the flow's process)",
    )
    tls: ReceiverTlsSettings = ReceiverTlsSettings()

    _ae = field_validator("ae_title")(_check_ae_title)

    @model_validator(mode="after")
    def _engine_speaks_tls(self) -> "ReceiverSettings":
        if self.engine is ReceiverEngine.DCMTK and self.tls.enabled:
            raise ValueError("engine dcmtk does not take receiver.tls: use engine pynetdicom (or auto) with TLS")
        return self

    _allowed = field_validator("allowed_aes")(_check_ae_titles)


class ListenerSettings(BaseModel):
    """``pacsflow listen``: the long-running Storage SCP that modalities and PACSs push to, the
    router that forwards by rule, and the hand-off of stable studies to the lake."""

    ae_title: str = Field("PACSFLOW", description="the listener's AE title (senders call it; forwarded copies "
                          "come from it)")
    host: str = Field("127.0.0.1", description="the address the listener binds")
    port: int = Field(11114, ge=1, le=65535, description="the port the listener binds")
    allowed_aes: list[str] = Field(
        default_factory=list,
        description="calling AE titles that may send to the listener (empty: nobody; the listener will not start)",
    )
    engine: ReceiverEngine = Field(
        ReceiverEngine.AUTO, description="receive engine, as receiver.engine: auto | dcmtk | pynetdicom"
    )
    max_object_mb: int = Field(2048, ge=1, description="a received object larger than this is refused, never kept")
    stable_after_s: float = Field(
        60.0, gt=0, description="a study is stable (routed, handed to the lake) when nothing of it arrived this long"
    )
    rules_file: Path | None = Field(None, description="routing rules (YAML); unset = keep and ingest nothing")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus metrics on listener.host at this port (0 = any free port)"
    )
    max_attempts: int = Field(8, ge=1, le=100, description="delivery attempts of an object before it is "
                              "dead-lettered (pacsflow route retry sends it again)")
    retry_backoff_s: float = Field(5.0, ge=0, description="first delay after a failed delivery; doubles, with jitter")
    retry_max_delay_s: float = Field(600.0, ge=0, description="cap on one delivery retry delay")
    timeout_s: float = Field(60.0, gt=0, description="DICOM network, ACSE and DIMSE timeouts towards destinations")
    commitment_port: int | None = Field(
        None, ge=1, le=65535, description="port (on listener.host, as listener.ae_title) where destinations with "
        "storage_commitment send their Storage Commitment reports (N-EVENT-REPORT); unset = off"
    )
    commitment_timeout_s: float = Field(
        600.0, gt=0, description="an object waits this long for its Storage Commitment report; then it is sent again "
        "(counts as a failed attempt)"
    )

    _ae = field_validator("ae_title")(_check_ae_title)

    _allowed = field_validator("allowed_aes")(_check_ae_titles)


class DeidSettings(BaseModel):
    """De-identification profile (PS3.15 E.1-1 option columns, by name), pixel policy, audit, zones."""

    options: list[Option] = Field(
        default_factory=lambda: list(DEFAULT_OPTIONS),
        description="option columns of Table E.1-1 to apply on top of the Basic Profile",
    )
    pixel_policy: PixelPolicy = Field(
        PixelPolicy.OCR,
        description="objects that may show burned-in text: ocr (default: Tesseract finds text, it is masked "
        "and checked gone, else quarantine) | quarantine | mask (configured regions, else quarantine) | allow",
    )
    pixel_masks: list[dict[str, Any]] = Field(
        default_factory=list,
        description="mask rules: {regions: [[xmin, ymin, xmax, ymax], ...], sop_class_uid, modality, "
        "manufacturer, model, rows, columns} (deid filter-recipe coordinates)",
    )
    ocr_min_confidence: int = Field(
        70, ge=0, le=100, description="ocr policy: Tesseract word confidence from which a word of 2+ letters or "
        "digits is text (its line is masked; after masking, any such word quarantines the object)"
    )
    ocr_max_frames: int = Field(
        100, ge=1, description="ocr policy: objects with more frames are quarantined, not read (about 1-5 s per frame)"
    )
    ocr_passes: int = Field(3, ge=1, le=10, description="ocr policy: mask-and-read-again passes before giving up")
    ocr_device_regions: bool = Field(
        True, description="ocr policy: also blank the regions of deid's %filter recipe that match the device"
    )
    audit: bool = Field(True, description="residual-PHI audit of every encoded output; a hit quarantines")
    recipe_file: Path | None = Field(
        None, description="a site's deid recipe (pydicom/deid format) applied on top of the profile: %header actions "
        "may only remove, blank, replace, jitter or add; %filter regions go to the pixel policy. Unset = none",
    )
    recipe_may_keep: bool = Field(
        False, description="let the recipe's KEEP spare top-level attributes from the profile (recorded in the "
        "manifest and DeidentificationMethod); off: such KEEPs are ignored and logged",
    )
    safe_private_list: SafePrivateList = Field(
        SafePrivateList.PS3_15_TABLE_E_3_10_1,
        description="safe private list used by Retain Safe Private (only this one for now)",
    )
    crosswalk_path: Path | None = Field(
        None, description="pseudonym <-> original CSV (PHI; owner-only; outside the lake); off when unset; with "
        "state.url set, it switches the crosswalk on in PostgreSQL instead (state.crosswalk_url)"
    )
    staging_retention_days: int = Field(7, ge=0, description="staged originals older than this are purged")
    quarantine_retention_days: int = Field(30, ge=0, description="quarantined originals older than this are purged")

    @field_validator("options")
    @classmethod
    def _options(cls, v: list[Option]) -> list[Option]:
        if conflicting_dates(v):
            raise ValueError("choose one of the full-dates and modified-dates options")
        return v

    @field_validator("pixel_masks")
    @classmethod
    def _masks(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # pixels imports pydicom: loaded when masks are given, not with this module
        from pacsflow.tasks.deid.pixels import parse_masks

        try:
            parse_masks(v)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid mask rule ({type(exc).__name__})") from None
        return v


class ServeSettings(BaseModel):
    """``pacsflow serve``: DICOMweb (QIDO-RS, WADO-RS, STOW-RS) over the lake, the study API and
    the analysts' dashboard, on one HTTP address."""

    host: str = Field("127.0.0.1", description="the address the HTTP service binds")
    port: int = Field(8042, ge=1, le=65535, description="the port the HTTP service binds")
    public_base_url: str | None = Field(
        None, description="the URL clients reach the service at (e.g. https://pacsflow.example.org); when set, "
        "FHIR ImagingStudy resources reference an Endpoint at <url>/dicom-web"
    )
    tls_cert: Path | None = Field(None, description="PEM certificate (and chain) the service presents: turns HTTPS on")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert (when not in the same file)")
    tokens_file: Path | None = Field(
        None, description="the hashed bearer tokens (pacsflow token add); default state_root/serve/tokens.json"
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="browser origins allowed to call the service (e.g. an OHIF viewer's)"
    )
    max_upload_mb: int = Field(2048, ge=1, description="a STOW-RS request body larger than this is refused (413)")
    query_limit: int = Field(1000, ge=1, le=100000, description="most results a QIDO-RS search returns per request")
    workers: int = Field(1, ge=1, le=32, description="HTTP worker processes; WADO-RS and searches are CPU-bound "
                         "in one process, so one per core serves more")

    @model_validator(mode="after")
    def _tls_pair(self) -> "ServeSettings":
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("tls_key needs tls_cert")
        return self


class Hl7Mode(str, enum.Enum):
    """What the HL7 facade writes: the messages' demographics as they are (a clinical facade) or the
    imaging pipeline's keyed pseudonym with what the de-identification profile allows."""

    IDENTIFIED = "identified"
    RESEARCH = "research"


class Hl7Settings(BaseModel):
    """``pacsflow hl7 listen``: the MLLP server that takes HL7v2 ADT messages, its durable inbox (PHI zone)
    and the worker that turns them into FHIR Patient resources on fhir.base_url."""

    host: str = Field("127.0.0.1", description="the address the MLLP server binds")
    port: int = Field(2575, ge=0, le=65535, description="the port the MLLP server binds (0 = any free port)")
    allowed_peers: list[str] = Field(
        default_factory=list,
        description="IP addresses or networks (CIDR) that may connect; empty = loopback only; others are closed "
        "at once",
    )
    tls_cert: Path | None = Field(None, description="PEM certificate (and chain) the MLLP server presents: turns TLS on")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert (when not in the same file)")
    max_message_kb: int = Field(1024, ge=1, description="a message larger than this is refused (AR) and its "
                                "connection closed")
    mode: Hl7Mode = Field(Hl7Mode.IDENTIFIED, description="identified (demographics as the messages say) | research "
                          "(the imaging pseudonym; gender, birth year, deceased flag only)")
    identifier_systems: dict[str, str] = Field(
        default_factory=dict, description="PID-3 assigning authority -> FHIR identifier system (URI)"
    )
    default_identifier_system: str = Field(
        "urn:pacsflow:hl7:unknown-authority",
        description="identifier system of a PID-3 whose assigning authority is empty or not in identifier_systems",
    )
    research_authority: str | None = Field(
        None, description="research mode (required there): the PID-3 assigning authority whose id the PACS's "
        "PatientID carries; the pseudonym is made from it as the imaging pipeline makes it"
    )
    inbox_retention_days: int = Field(30, ge=1, description="applied or given-up messages older than this are "
                                      "deleted from the inbox")
    apply_retries: int = Field(10, ge=0, le=100, description="retries of a message the FHIR server could not take "
                               "(down, conflict) before it is failed for good (pacsflow hl7 replay sends it again)")
    apply_backoff_s: float = Field(5.0, ge=0, description="first delay after a failed apply; doubles, with jitter")
    apply_max_delay_s: float = Field(600.0, ge=0, description="cap on one apply retry delay")

    @field_validator("allowed_peers")
    @classmethod
    def _peers(cls, v: list[str]) -> list[str]:
        for peer in v:
            try:
                ipaddress.ip_network(peer.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{peer!r} is not an IP address or network") from None
        return [peer.strip() for peer in v]

    @model_validator(mode="after")
    def _consistent(self) -> "Hl7Settings":
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("tls_key needs tls_cert")
        if self.mode is Hl7Mode.RESEARCH and not self.research_authority:
            raise ValueError("research mode needs research_authority (the PID-3 authority of the PACS's PatientID)")
        return self


class FhirSettings(BaseModel):
    """The FHIR server that receives ImagingStudy and Patient resources (off when base_url is unset)."""

    base_url: str | None = Field(None, description="FHIR R4 base URL; unset = no FHIR sync")
    token: SecretStr | None = Field(None, description="bearer token (secret: env or credentials_block only)")
    username: str | None = Field(None, description="basic-auth user name, with password")
    password: SecretStr | None = Field(None, description="basic-auth password (secret: env or credentials_block only)")
    credentials_block: str | None = Field(
        None, description="Prefect Secret block holding a token, or JSON {token} or {username, password}"
    )
    ca_bundle: Path | None = Field(
        None, description="PEM file of the CAs that sign the server's TLS certificate (default: the system's)"
    )
    client_cert: Path | None = Field(None, description="PEM client certificate, for servers that require one")
    client_key: Path | None = Field(None, description="PEM private key of client_cert (when not in the same file)")
    timeout_s: float = Field(30.0, gt=0, description="timeout of one HTTP request (seconds)")
    batch_size: int = Field(50, ge=1, le=1000, description="studies per transaction Bundle")
    pseudonym_system: str = Field("urn:pacsflow:pseudonym", description="identifier system of Patient pseudonyms")
    wado_rs_base_url: str | None = Field(
        None, description="DICOMweb base URL: adds an Endpoint (dicom-wado-rs) to every ImagingStudy; default: "
        "serve.public_base_url + /dicom-web"
    )
    identified_sync: bool = Field(
        False, description="send patient name and birth date when the catalog keeps them (the server holds PHI then)"
    )
    study_timezone: str | None = Field(
        None,
        description="IANA time zone of StudyDate/StudyTime (the PACS's local time, e.g. Europe/Zurich); FHIR "
        "needs an offset when a time is given, so without it ImagingStudy.started carries the date only",
    )
    max_retries: int = Field(4, ge=0, le=20, description="retries of a request on 429, 5xx, 409 and network errors")
    retry_backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles per retry, with jitter")
    retry_max_delay_s: float = Field(60.0, ge=0, description="cap on one retry delay, also on Retry-After")

    @field_validator("study_timezone")
    @classmethod
    def _timezone(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("must be an IANA time zone name such as Europe/Zurich") from None
        return v


_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")


def _check_oid(value: str | None) -> str | None:
    if value is not None and (len(value) > 64 or not _OID.fullmatch(value)):
        raise ValueError("must be an OID: digits and dots, at most 64 characters (e.g. 1.2.3.4)")
    return value


class XdsCode(BaseModel):
    """One coded value of XDS metadata (an ebXML Classification): code, coding scheme, display name."""

    code: str = Field(..., min_length=1, description="the code")
    scheme: str = Field(..., min_length=1, description="its coding scheme (an OID or the affinity domain's name)")
    display: str = Field(..., min_length=1, description="its display name")


class XdsiSettings(BaseModel):
    """XDS-I.b Imaging Document Source (README "Sharing through XDS-I.b"): one KOS manifest per
    cataloged study, submitted to a repository (RAD-68 / ITI-41), images served by RAD-69 and WADO-RS.
    For a research affinity domain only: the patient ID is the pseudonym under ``pseudonym_oid``.
    Off while ``repository_url`` is unset. The codes' defaults are placeholders: set your affinity
    domain's."""

    repository_url: str | None = Field(
        None, description="the Document Repository's ITI-41 (Provide and Register Document Set-b) URL; unset = "
        "no publishing")
    registry_url: str | None = Field(
        None, description="the Document Registry's ITI-18 (Registry Stored Query) URL, for `pacsflow xdsi check`")
    rad69_url: str | None = Field(
        None, description="where consumers reach our RAD-69 endpoint; default serve.public_base_url + /xdsi/rad69")
    retrieve_url: str | None = Field(
        None, description="the WADO-RS base each manifest names as Retrieve URL; default serve.public_base_url + "
        "/dicom-web")
    source_oid: str | None = Field(
        None, description="our Imaging Document Source's OID: the KOS's Retrieve Location UID, the RAD-69 "
        "repositoryUniqueId and the submission set's sourceId")
    repository_unique_id: str | None = Field(
        None, description="the Document Repository's uniqueId (what consumers give ITI-43); named in the audit of "
        "each submission")
    pseudonym_oid: str | None = Field(
        None, description="assigning authority of the pseudonyms: patientId = <pseudonym>^^^&<oid>&ISO")
    class_code: XdsCode = Field(XdsCode(code="IMAGES", scheme="1.3.6.1.4.1.19376.1.2.6.1", display="Images"),
                                description="DocumentEntry.classCode")
    type_code: XdsCode = Field(XdsCode(code="18748-4", scheme="2.16.840.1.113883.6.1",
                                       display="Diagnostic imaging study"), description="DocumentEntry.typeCode")
    practice_setting_code: XdsCode = Field(XdsCode(code="394914008", scheme="2.16.840.1.113883.6.96",
                                                   display="Radiology"),
                                           description="DocumentEntry.practiceSettingCode")
    healthcare_facility_type_code: XdsCode = Field(
        XdsCode(code="22232009", scheme="2.16.840.1.113883.6.96", display="Hospital"),
        description="DocumentEntry.healthcareFacilityTypeCode")
    confidentiality_code: XdsCode = Field(XdsCode(code="N", scheme="2.16.840.1.113883.5.25", display="normal"),
                                          description="DocumentEntry.confidentialityCode")
    content_type_code: XdsCode = Field(XdsCode(code="18748-4", scheme="2.16.840.1.113883.6.1",
                                               display="Diagnostic imaging study"),
                                       description="SubmissionSet.contentTypeCode")
    language_code: str = Field("en-US", description="DocumentEntry.languageCode")
    audit_url: str | None = Field(
        None, description="ATNA audit repository as syslog+udp://host:port or syslog+tcp://host:port (RFC 5424; "
        "TCP framed by octet counting, RFC 6587); unset = no audit messages")
    consent_required: bool = Field(
        False, description="publish a study only when its patient pseudonym has a research-consent flag "
        "(`pacsflow xdsi consent grant`)")
    ca_bundle: Path | None = Field(None, description="PEM file of the CAs that sign the repository's certificate")
    client_cert: Path | None = Field(None, description="PEM client certificate, for repositories that require one")
    client_key: Path | None = Field(None, description="PEM private key of client_cert (when not in the same file)")
    timeout_s: float = Field(60.0, gt=0, description="timeout of one SOAP request (seconds)")
    max_retries: int = Field(4, ge=0, le=20, description="retries of a submission on network errors, 5xx and 429")
    retry_backoff_s: float = Field(2.0, ge=0, description="first retry delay; doubles per retry, with jitter")
    retry_max_delay_s: float = Field(120.0, ge=0, description="cap on one retry delay")

    _oids = field_validator("source_oid", "repository_unique_id", "pseudonym_oid")(_check_oid)

    @field_validator("audit_url")
    @classmethod
    def _audit_url(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"syslog\+(udp|tcp)://[^/:]+:[0-9]{1,5}/?", v):
            raise ValueError("must be syslog+udp://host:port or syslog+tcp://host:port")
        return v

    @model_validator(mode="after")
    def _publishing_needs_ids(self) -> "XdsiSettings":
        if self.repository_url and not (self.source_oid and self.pseudonym_oid):
            raise ValueError("repository_url needs source_oid and pseudonym_oid")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.repository_url)


class StorageSettings(BaseModel):
    """How fsspec reaches ``storage_root`` when it is an object store URL (``s3://bucket/prefix``):
    the s3fs ``storage_options``. Keys are never settings: by default the AWS credential chain
    applies (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, an instance role);
    ``access_key_env``/``secret_key_env`` name other environment variables to read them from."""

    endpoint_url: str | None = Field(
        None, description="the S3 endpoint of a store other than AWS (MinIO, Ceph, moto), e.g. https://s3.example.org"
    )
    region: str | None = Field(None, description="the bucket's region; unset = the AWS default chain")
    access_key_env: str | None = Field(
        None, description="name of the environment variable holding the access key id; unset = AWS credential chain"
    )
    secret_key_env: str | None = Field(
        None, description="name of the environment variable holding the secret access key (with access_key_env)"
    )
    conditional_writes: bool = Field(
        True, description="write lake objects with If-None-Match: * (never overwrite blindly); turn off only for "
        "an S3 store that answers 501 to conditional PUTs"
    )

    @model_validator(mode="after")
    def _key_pair(self) -> "StorageSettings":
        if (self.access_key_env is None) != (self.secret_key_env is None):
            raise ValueError("access_key_env and secret_key_env go together")
        return self

    def fsspec_options(self) -> dict[str, Any]:
        """The ``storage_options`` for fsspec (s3fs's argument names), keys read from the environment
        now. Holds secrets: pass it on, never log or persist it."""
        options: dict[str, Any] = {}
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        if self.region:
            options["client_kwargs"] = {"region_name": self.region}
        if self.access_key_env and self.secret_key_env:
            missing = [n for n in (self.access_key_env, self.secret_key_env) if not os.environ.get(n)]
            if missing:
                raise SettingsError(f"storage: environment variable {', '.join(missing)} is not set")
            options["key"] = os.environ[self.access_key_env]
            options["secret"] = os.environ[self.secret_key_env]
        return options


class CatalogBackendName(str, enum.Enum):
    SNAPSHOT = "snapshot"  # today's store: one host (flock, hard links, a symlink swap)
    DELTA = "delta"  # Delta Lake tables: several processes and machines, local disk or S3


class CatalogSettings(BaseModel):
    """Which store the catalog commits to (README "Catalog table format (`catalog.backend`)")."""

    backend: CatalogBackendName = Field(
        CatalogBackendName.SNAPSHOT, description="snapshot (one host, under catalog_root) or delta (Delta Lake "
        "tables that several machines commit to)"
    )
    location: str = Field("", description="delta: folder or s3:// URL of the tables; empty = <catalog_root>/delta")
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="delta on S3: object-store options (AWS_ENDPOINT_URL, AWS_REGION, "
        "aws_conditional_put=etag...); credentials come from the environment, never from here"
    )

    def open_store(self, catalog_root: Path) -> Any:
        """The catalog store of this backend (a CatalogStore for snapshot)."""
        from pacsflow.catalog.backends import open_store

        return open_store(catalog_root, self.backend.value, self.location, self.storage_options)

    def reader(self, catalog_root: Path) -> Any:
        """What pacsflow.catalog.views reads: the root itself for snapshot (as ever), else the store."""
        return catalog_root if self.backend is CatalogBackendName.SNAPSHOT else self.open_store(catalog_root)


class StateSettings(BaseModel):
    """Where the ledgers, the FHIR ledger and the study leases live: SQLite files under state_root
    (one machine) or one PostgreSQL database that every machine of a deployment shares."""

    url: str | None = Field(
        None, repr=False,
        description="unset = SQLite under state_root (one machine); postgresql://user@host:port/db = the ingest "
        "and FHIR ledgers and the study leases in PostgreSQL, one schema each (give the password through "
        "PGPASSWORD or ~/.pgpass rather than in the URL; shown masked)",
    )
    crosswalk_url: str | None = Field(
        None, repr=False,
        description="postgresql:// URL (its own role) of the de-identification crosswalk (PHI), kept in the "
        "schema pacsflow_phi; unset = state.url when deid.crosswalk_path is set, else the CSV file (shown masked)",
    )

    @field_validator("url", "crosswalk_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None:
            check_url(v)
        return v

    @field_serializer("url", "crosswalk_url", when_used="json")
    def _masked(self, v: str | None) -> str | None:
        # `pacsflow settings` prints JSON; Python dumps keep the password so settings can be rebuilt
        return mask_url(v) if v is not None else None


class MigrateSettings(BaseModel):
    """The migration workbench (`pacsflow migrate`, README "The migration workbench"). The window, the
    rate and pause/resume are not settings: `pacsflow migrate run` keeps them in the state database."""

    instances_per_s: float = Field(
        0.0, ge=0, description="the rate an inventory's estimate assumes; 0 = measured (median of the last "
        "nightly runs' instances/s, else 190)"
    )
    checksum_sample: float = Field(
        0.05, gt=0, le=1, description="share of stored objects whose SHA-256 `migrate reconcile` re-reads "
        "(--sample or --all override it)"
    )


class ShardSettings(BaseModel):
    """The ``plan`` and ``ingest-shard`` flows (README "Shards and recovery"): how a window is cut
    into shard flow runs, how long a claimed study stays held, and which worker this process is."""

    max_studies: int = Field(500, ge=1, description="a StudyDate day with more studies than this is cut into "
                             "parts of at most this many: one ingest-shard flow run each")
    lease_s: float = Field(300.0, gt=0, description="a shard run holds its studies this long (seconds), renewed "
                           "every third of it; a killed run's studies are claimable again once it has run out")
    deployment: str = Field("ingest-shard/ingest-shard", description="the deployment (flow/deployment) that "
                            "plan starts once per shard")
    worker: int | None = Field(
        None, ge=0, le=999, description="this worker's number (env PACSFLOW_SHARDS__WORKER), for several workers "
        "on one PACS: replaces {worker} in receiver.ae_title, and its shard runs' receiver listens on "
        "receiver.port + worker; unset = receiver as configured")

    def receiver_of(self, receiver: "ReceiverSettings") -> "ReceiverSettings":
        """``receiver`` as this worker's shard runs use it (its own AE title and port); unchanged
        when no worker number is set and the AE title has no ``{worker}``."""
        if self.worker is None:
            if "{worker}" in receiver.ae_title:
                raise SettingsError("receiver.ae_title has {worker}: set shards.worker (PACSFLOW_SHARDS__WORKER)")
            return receiver
        title = _check_ae_title(receiver.ae_title.replace("{worker}", str(self.worker)))
        port = receiver.port + self.worker
        if port > 65535:
            raise SettingsError(f"receiver.port + shards.worker = {port}: above 65535")
        return receiver.model_copy(update={"ae_title": title, "port": port})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PACSFLOW_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    pacs: PacsSettings = PacsSettings()
    sources: dict[str, PacsSettings] = Field(
        default_factory=dict, description="further PACS by name (1-16 of a-z, 0-9, -; not `pacs`, which names the "
        "one above), each with the fields of pacs, e.g. PACSFLOW_SOURCES__B__PORT: plan cuts shards of every one "
        "(keys `b/2026-11-01`), one watermark each")
    receiver: ReceiverSettings = ReceiverSettings()
    listener: ListenerSettings = ListenerSettings()
    serve: ServeSettings = ServeSettings()
    hl7: Hl7Settings = Hl7Settings()
    calling_ae: str = Field("PACSFLOW", description="our AE title when we call the PACS")
    retrieve_method: RetrieveMethod = Field(
        RetrieveMethod.C_MOVE, description="c-move (the PACS sends to our Storage SCP) or c-get (on our association)"
    )

    # Zones. storage_root is the de-identified lake (any fsspec URL); state_root holds PHI
    # (staging of received originals, quarantine, ledger) and must stay outside the lake.
    storage_root: str = Field("var/lake/dicom", description="the de-identified DICOM files: a path or any fsspec URL")
    storage: StorageSettings = StorageSettings()
    catalog_root: Path = Field(Path("var/lake/catalog"), description="the Parquet catalog (a local POSIX file system)")
    catalog: CatalogSettings = CatalogSettings()
    state_root: Path = Field(
        Path("var/state"), description="PHI zone (staging, quarantine, ledgers): owner-only, outside the lake"
    )

    deid: DeidSettings = DeidSettings()
    fhir: FhirSettings = FhirSettings()
    xdsi: XdsiSettings = XdsiSettings()
    state: StateSettings = StateSettings()
    migrate: MigrateSettings = MigrateSettings()
    shards: ShardSettings = ShardSettings()

    deid_key: SecretStr | None = Field(
        None, description="secret key for pseudonyms, UIDs and date shifts (16+ characters): keep it out of the "
        "settings file (environment, deid_key_file or deid_key_block)"
    )
    deid_key_block: str | None = Field(None, description="Prefect Secret block holding the key")
    deid_key_file: Path | None = Field(
        None, description="file holding the key (owner-only permissions); `pacsflow init` writes a random one"
    )

    overlap_days: int = Field(2, ge=0, le=365, description="each run starts this many days before the last watermark")
    initial_since: str | None = Field(None, description="first run's window start (YYYYMMDD)")
    initial_days: int = Field(30, ge=0, description="first run without initial_since: this many days back")
    max_associations: int = Field(
        2, ge=1, le=64, description="PACS associations at once, shared by all runs (Prefect limit pacs-associations)"
    )
    slot_wait_s: float = Field(
        3600.0,
        ge=0,
        description="how long a run waits for its PACS slots while other runs hold them (it logs the holders "
        "every 15 s) before it gives up; a killed run's slots come back within 30 s",
    )
    retrieve_retries: int = Field(3, ge=0, le=20, description="retries of a study within a run")
    retry_delay_s: float = Field(2.0, ge=0, description="first retry delay of a study; doubles per retry, with jitter")
    max_attempts: int = Field(
        5, ge=1, description="runs that may fail a study transiently before it is quarantined as permanent"
    )
    commit_batch: int = Field(200, ge=1, description="studies per atomic catalog commit")
    sweep_lookback_days: int = Field(
        30, ge=1, le=3650, description="the reconciliation sweep C-FINDs this many days back (one C-FIND per day)"
    )
    min_free_mb: int = Field(
        500, ge=0, description="a run does not start when the lake, catalog or state zone has less free space (MiB)"
    )
    deid_workers: int = Field(
        default_factory=lambda: min(4, os.cpu_count() or 1),
        ge=0,
        le=64,
        description="processes for de-identification (default: the CPUs, at most 4); 0 = in the flow's own process",
    )

    @model_validator(mode="after")
    def _zones_apart(self) -> "Settings":
        """The PHI zone (staging, quarantine, ledger) and the crosswalk must never sit inside the lake or
        the catalog: whatever is there is shared with analysts."""
        state = self.state_root.resolve()
        lake_roots = [self.catalog_root.resolve()]
        if self.local_storage_root is not None:
            lake_roots.append(self.local_storage_root.resolve())
        for root in lake_roots:
            if state == root or root in state.parents or state in root.parents:
                raise ValueError("state_root must be outside storage_root and catalog_root (it holds PHI)")
            crosswalk = self.deid.crosswalk_path
            if crosswalk is not None and (root == crosswalk.resolve() or root in crosswalk.resolve().parents):
                raise ValueError("deid.crosswalk_path must be outside storage_root and catalog_root (it holds PHI)")
        return self

    @model_validator(mode="after")
    def _wado_rs_from_public_url(self) -> "Settings":
        """One source of the addresses FHIR and XDS-I.b publish: ``fhir.wado_rs_base_url``,
        ``xdsi.retrieve_url`` and ``xdsi.rad69_url`` when set (a proxy that maps another path), else
        ``serve.public_base_url`` + ``/dicom-web`` (or ``/xdsi/rad69``)."""
        if self.fhir.wado_rs_base_url is None and self.serve.public_base_url:
            base = self.serve.public_base_url.rstrip("/") + "/dicom-web"
            self.fhir = self.fhir.model_copy(update={"wado_rs_base_url": base})
        public = self.serve.public_base_url.rstrip("/") if self.serve.public_base_url else None
        if public and (self.xdsi.retrieve_url is None or self.xdsi.rad69_url is None):
            self.xdsi = self.xdsi.model_copy(update={"retrieve_url": self.xdsi.retrieve_url or public + "/dicom-web",
                                                     "rad69_url": self.xdsi.rad69_url or public + "/xdsi/rad69"})
        return self

    @field_validator("sources")
    @classmethod
    def _source_names(cls, v: dict[str, PacsSettings]) -> dict[str, PacsSettings]:
        for name in v:  # they go into shard keys, run names and state names
            if not SOURCE_NAME.fullmatch(name) or name == DEFAULT_SOURCE:
                raise ValueError(f"{name!r}: a source name is 1-16 of a-z, 0-9 and -, and not {DEFAULT_SOURCE!r}")
        return v

    def for_source(self, name: str | None) -> "Settings":
        """These settings with ``pacs`` replaced by the named source's (None or ``pacs``: unchanged)."""
        if name is None or name == DEFAULT_SOURCE:
            return self
        if name not in self.sources:
            raise SettingsError(f"sources: no PACS named {name!r} (known: {', '.join(sorted(self.sources)) or 'none'})")
        return self.model_copy(update={"pacs": self.sources[name]})

    @field_validator("calling_ae")
    @classmethod
    def _calling_ae(cls, v: str) -> str:
        return _check_ae_title(v)

    @field_validator("initial_since")
    @classmethod
    def _since(cls, v: str | None) -> str | None:
        if v is not None and (len(v) != 8 or not v.isdigit()):
            raise ValueError("must be a date as YYYYMMDD")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config = os.environ.get("PACSFLOW_CONFIG")
        if config:
            sources.append(_config_file_source(settings_cls, Path(config)))
        return tuple(sources)

    # -- derived locations (one property each; the same shape as the catalog store's) ---------
    @property
    def local_storage_root(self) -> Path | None:
        """The lake's folder when it is on a local file system; None for object stores."""
        if "://" not in self.storage_root or self.storage_root.startswith("file://"):
            return Path(self.storage_root.removeprefix("file://"))
        return None

    @property
    def staging_dir(self) -> Path:
        return self.state_root / "staging"

    @property
    def quarantine_dir(self) -> Path:
        return self.state_root / "quarantine"

    @property
    def listener_dir(self) -> Path:
        """The listener's PHI zone: received originals, its study tracker and outbox."""
        return self.state_root / "listener"

    @property
    def hl7_dir(self) -> Path:
        """The HL7 facade's PHI zone: its inbox of received messages."""
        return self.state_root / "hl7"

    @property
    def tokens_path(self) -> Path:
        """The serve tokens' file (hashes and scopes only; still owner-only)."""
        return self.serve.tokens_file or self.state_root / "serve" / "tokens.json"

    @property
    def ledger_path(self) -> Path:
        return self.state_root / "ledger.sqlite"

    def with_secret_blocks(self, load_block: Callable[[str], Any]) -> "Settings":
        """A copy whose secrets named by block (``deid_key_block``, ``fhir.credentials_block``) are
        filled in by ``load_block(name)``; the flow layer passes the Prefect Secret loader, so this
        module (like everything below the flows) never imports Prefect."""
        update: dict[str, Any] = {}
        if self.deid_key is None and self.deid_key_file is None and self.deid_key_block:
            update["deid_key"] = SecretStr(str(load_block(self.deid_key_block)))
        fhir = self.fhir
        if fhir.credentials_block and fhir.token is None and not fhir.username:
            creds = fhir_credentials(load_block(fhir.credentials_block))
            update["fhir"] = fhir.model_copy(update=creds)
        return self.model_copy(update=update) if update else self

    def resolve_deid_key(self) -> bytes:
        """The de-identification key, from env/settings, a key file or (through the flows) a Prefect
        Secret block. Never logged."""
        if self.deid_key is not None:
            key = self.deid_key.get_secret_value()
        elif self.deid_key_file is not None:
            try:
                key = self.deid_key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise SettingsError(f"deid_key_file: cannot read {self.deid_key_file} "
                                    f"({describe_os_error(exc)})") from None
        elif self.deid_key_block:
            raise SettingsError("deid_key_block: the Secret block was not loaded; load settings with "
                                "pacsflow.flows.secrets.load_run_settings()")
        else:
            raise SettingsError(
                "deid_key: no de-identification key; set PACSFLOW_DEID_KEY, PACSFLOW_DEID_KEY_FILE "
                "or PACSFLOW_DEID_KEY_BLOCK"
            )
        if len(key) < 16:
            raise SettingsError("deid_key: must be at least 16 characters")
        return key.encode("utf-8")


def _config_file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    """The file named by PACSFLOW_CONFIG. Missing or broken is an error naming the variable: a typo
    in the path must not fall back to the defaults. Messages never quote the file's text."""
    if not path.is_file():
        raise SettingsError(f"PACSFLOW_CONFIG: no file at {path}")
    try:
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    except OSError as exc:
        raise SettingsError(f"PACSFLOW_CONFIG: cannot read {path} ({describe_os_error(exc)})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise SettingsError(f"PACSFLOW_CONFIG: {path} is not valid YAML{where}") from None
    except (TypeError, ValueError):
        raise SettingsError(f"PACSFLOW_CONFIG: {path} is not a mapping of settings") from None


def fhir_credentials(value: Any) -> dict[str, Any]:
    """A credentials secret's value (a token string, or a mapping or JSON text with ``token`` or
    ``username`` + ``password``) as ``FhirSettings`` fields. Messages never show the value."""
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("{"):
            return {"token": SecretStr(text)}
        try:
            value = json.loads(text)
        except ValueError:
            raise SettingsError("fhir.credentials_block: the secret is neither a token nor JSON") from None
    if isinstance(value, dict):
        if value.get("token"):
            return {"token": SecretStr(str(value["token"]))}
        if value.get("username") and value.get("password") is not None:
            return {"username": str(value["username"]), "password": SecretStr(str(value["password"]))}
    raise SettingsError("fhir.credentials_block: expected a token, or {token} or {username, password}")


class SettingsError(ValueError):
    """Invalid settings; the message names the setting and never contains a secret value."""


def load_settings(**overrides: Any) -> Settings:
    """Build and validate settings, turning pydantic's error into one naming each bad setting."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False):
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            problems.append(f"{where}: {err['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
