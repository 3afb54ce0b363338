"""XDS-I.b publishing (RAD-68): the catalog's new and changed studies, one KOS manifest each, sent to
the XDS.b repository, with the outcome of each study in the ledger.

Plain code (no Prefect) over the pure builders (:mod:`.manifest`, :mod:`.ebxml`), the repository's
network boundary (:mod:`.client`) and the ledger (:mod:`.ledger`): :func:`plan_publish` (what is
due), :func:`publish_batch` (one batch: build, consent, send, record) and :func:`run_publish`, the
one loop. The loop takes the batch step as a callable: :func:`publish_catalog` passes one that calls
``publish_batch`` in this process; the ``xdsi-publish`` flow (:mod:`pacsflow.flows.xdsi_publish`)
passes its Prefect task ``xdsi-submit``, which calls the same function.

* **Due**: a study whose manifest (its :func:`.manifest.content_hash`) the registry does not have:
  new, changed, pending, or failed for a transient reason. A study the registry refused is sent
  again only once it changes, or when ``only_failed`` asks for the failed studies
  (:func:`.ledger.needs_publishing`).
* **A changed study replaces** the entry published last (RPLC); its new KOS has new UIDs.
* **Consent** (``xdsi.consent_required``): a due study whose patient pseudonym has no research-consent
  flag is recorded pending, not sent; the first run after ``pacsflow xdsi consent grant`` sends it.
* **One study's failure never stops the others**: a study that cannot have a manifest (no pseudonym,
  date or instances: ManifestError) and one the registry refuses (XdsRegistryError, with its error
  code, e.g. XDSUnknownPatientId) are recorded failed for good, and the batch goes on. A repository
  that does not answer after the client's own retries (XdsUnavailable), or that refuses the
  configuration (XdsConfigurationError: URL, TLS), stops the run: the batch's unsent studies are
  recorded failed, transient (the next run sends them), and the studies of later batches pending.
* **Already registered**: XDSRegistryDuplicateUniqueIdInMessage means the registry holds this very
  KOS (its UID is derived from the study and its content), e.g. the answer to an earlier send was
  lost, or the ledger was rebuilt: the study is recorded published, not failed.
* **No PHI**: reports and the ledger hold catalog study UIDs, error codes and one-line reasons.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple, Protocol

import duckdb

from pacsflow.catalog.views import Catalog, connect as connect_catalog
from pacsflow.tasks.core.clock import new_run_id
from pacsflow.tasks.core.markdown import cell
from pacsflow.tasks.core.errors import XdsConfigurationError, XdsRegistryError, XdsUnavailable, error_text
from pacsflow.tasks.settings import Settings, XdsiSettings
from pacsflow.tasks.xdsi import audit
from pacsflow.tasks.xdsi.audit import AuditLog
from pacsflow.tasks.xdsi.client import SubmissionResult, XdsRepositoryClient
from pacsflow.tasks.xdsi.ebxml import Submission, build_request
from pacsflow.tasks.xdsi.ledger import (
    Failure,
    LedgerRow,
    Publication,
    PublishStatus,
    XdsiLedger,
    needs_publishing,
)
from pacsflow.tasks.xdsi.manifest import (
    KOS_SOP_CLASS_UID,
    Manifest,
    ManifestError,
    StudyManifestInput,
    build_manifest,
    content_hash,
    load_inputs,
)

log = logging.getLogger(__name__)

#: Studies per batch: one ``xdsi-submit`` task each in the flow (a submission is one study).
BATCH_STUDIES = 50
#: Studies whose instances are read and hashed at once while planning (bounds memory, not requests).
PLAN_CHUNK = 200
#: The registry already holds a document with this uniqueId: ours (see the module docstring).
ALREADY_REGISTERED = "XDSRegistryDuplicateUniqueIdInMessage"
NO_CONSENT = "no research consent for this patient (xdsi.consent_required; `pacsflow xdsi consent grant`)"

_SQL_ALL = "SELECT study_uid FROM studies ORDER BY patient_pseudo_id, study_uid"
_SQL_SOME = ("SELECT study_uid FROM studies WHERE study_uid IN (SELECT unnest(?::VARCHAR[])) "
             "ORDER BY patient_pseudo_id, study_uid")


class RepositoryClient(Protocol):
    """What publishing needs of the repository (:class:`.client.XdsRepositoryClient`; a fake in tests)."""

    requests: int  # requests sent so far, retries included

    def provide_and_register(self, request: Any, kos: bytes) -> SubmissionResult: ...


def check_publishable(xdsi: XdsiSettings) -> None:
    """XdsConfigurationError naming the first setting a publish run lacks (before anything is sent)."""
    if not xdsi.repository_url:
        raise XdsConfigurationError("xdsi.repository_url is not set: set PACSFLOW_XDSI__REPOSITORY_URL (or "
                                    "xdsi.repository_url in the PACSFLOW_CONFIG file) to the repository's ITI-41 URL")
    for name in ("source_oid", "pseudonym_oid", "retrieve_url"):
        if not getattr(xdsi, name):
            hint = " (or serve.public_base_url)" if name == "retrieve_url" else ""
            raise XdsConfigurationError(f"xdsi.{name} is not set{hint}: every manifest names it")


# -- what is due -----------------------------------------------------------------------------------
@dataclass
class PublishPlan:
    """The studies considered, how many are unchanged, and the due ones with their content hash (in order)."""

    selected: int = 0
    unchanged: int = 0
    refused_before: int = 0  # a registry refused this very manifest in an earlier run: not sent again
    due: dict[str, str] = field(default_factory=dict)

    def batches(self, size: int | None = None) -> list[dict[str, str]]:
        size = size or BATCH_STUDIES
        items = list(self.due.items())
        return [dict(items[i : i + size]) for i in range(0, len(items), size)]


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def _catalog_uids(con: duckdb.DuckDBPyConnection, study_uids: Sequence[str] | None) -> list[str]:
    if study_uids is None:
        return [r[0] for r in con.execute(_SQL_ALL).fetchall()]
    return [r[0] for r in con.execute(_SQL_SOME, [sorted(set(study_uids))]).fetchall()] if study_uids else []


def plan_publish(con: duckdb.DuckDBPyConnection, ledger: XdsiLedger, xdsi: XdsiSettings,
                 study_uids: Sequence[str] | None = None, *, only_failed: bool = False) -> PublishPlan:
    """The studies to consider (all of the catalog, or ``study_uids``; with ``only_failed`` those of
    them the ledger has failed, transient or not) and which are due. ``only_failed`` sends a study
    the registry refused although it did not change; otherwise :func:`.ledger.needs_publishing` decides."""
    if only_failed:
        failed = ledger.failed()
        study_uids = failed if study_uids is None else sorted(set(failed) & set(study_uids))
    plan = PublishPlan()
    for chunk in _chunks(_catalog_uids(con, study_uids), PLAN_CHUNK):
        hashes = {uid: content_hash(inp, xdsi) for uid, inp in load_inputs(con, chunk).items()}
        rows = ledger.entries(hashes)
        for uid in chunk:
            if uid not in hashes:
                continue  # left the catalog between the two reads
            row = rows.get(uid)
            due = (row is None or row.content_hash != hashes[uid]) if only_failed else needs_publishing(row, hashes[uid])
            plan.selected += 1
            if due:
                plan.due[uid] = hashes[uid]
            elif row is not None and row.status is PublishStatus.FAILED:
                plan.refused_before += 1
            else:
                plan.unchanged += 1
    return plan


def owed_studies(ledger: XdsiLedger) -> list[str]:
    """What earlier runs left to send: transient failures and pending studies (waiting for consent,
    or not attempted because a run stopped). The nightly run adds them to its committed studies."""
    pending = {uid for uid, row in ledger.entries().items() if row.status is PublishStatus.PENDING}
    return sorted(pending | set(ledger.failed(transient=True)))


# -- one batch -------------------------------------------------------------------------------------
class StudyFailure(NamedTuple):
    """Why a study was not published: the registry's error code (or our error class), one line, and
    whether the next run tries again."""

    code: str
    reason: str
    transient: bool


@dataclass
class BatchResult:
    """What happened to the studies of one batch (catalog study UIDs and one-line reasons only)."""

    published: list[str] = field(default_factory=list)  # first publication of the study
    replaced: list[str] = field(default_factory=list)  # published as a replacement (RPLC) of its last entry
    unchanged: list[str] = field(default_factory=list)
    pending_consent: list[str] = field(default_factory=list)
    failed: dict[str, StudyFailure] = field(default_factory=dict)
    requests: int = 0  # requests to the repository, retries included


def audit_submission(trail: AuditLog | None, xdsi: XdsiSettings, manifest: Manifest, submission: Submission, *,
                     success: bool) -> None:
    """The ATNA record of one RAD-68 submission (DICOM Export, 110106), accepted or refused, sent now
    to ``xdsi.audit_url`` (nothing without it). It names the pseudonymous patient ID, the study, the
    submission set's uniqueId and the KOS only; a failed send is counted by the log, never raised."""
    if trail is None:
        return
    trail.record(audit.submission_event(
        outcome=audit.Outcome.SUCCESS if success else audit.Outcome.SERIOUS_FAILURE,
        repository_url=xdsi.repository_url or "", audit_source_id=audit.audit_source_id(xdsi),
        patient=audit.patient_cx(manifest.patient_pseudo_id, xdsi.pseudonym_oid),
        submission_set=submission.submission_set_unique_id,
        documents=(audit.Document(manifest.sop_instance_uid, xdsi.repository_unique_id),),
        studies=(audit.Study(manifest.study_uid, ((KOS_SOP_CLASS_UID, 1),)),)))


def _now() -> datetime:
    return datetime.now(timezone.utc)


class _Batch:
    """One batch's bookkeeping: the ledger is written study by study, so a batch that stops (or a
    Prefect retry of it) leaves every outcome so far recorded."""

    def __init__(self, ledger: XdsiLedger, xdsi: XdsiSettings, run_id: str) -> None:
        self.ledger, self.xdsi, self.run_id = ledger, xdsi, run_id
        self.result = BatchResult()
        self.audit: AuditLog | None = None  # opened when the first manifest goes out

    def published(self, manifest: Manifest, submission: Submission, replaces: str | None) -> None:
        self.ledger.mark_published([Publication(manifest.study_uid, manifest.content_hash, manifest.sop_instance_uid,
                                                submission.entry_uuid, replaces)], self.run_id)
        (self.result.replaced if replaces else self.result.published).append(manifest.study_uid)

    def failed(self, uid: str, digest: str, failure: StudyFailure) -> None:
        self.ledger.mark_failed([Failure(uid, digest, failure.code, failure.reason, failure.transient)], self.run_id)
        self.result.failed[uid] = failure


def _earlier_in_run(row: LedgerRow | None, digest: str, run_id: str, result: BatchResult) -> bool:
    """A Prefect retry of the batch: what this run already did to the study (published it, or the
    registry refused it) stands, and is not sent again."""
    if row is None or row.run_id != run_id:
        return False
    if row.status is PublishStatus.PUBLISHED and row.content_hash == digest:
        (result.replaced if row.replaced_entry_uuid else result.published).append(row.study_uid)
        return True
    if row.status is PublishStatus.FAILED and not row.transient and row.attempted_hash == digest:
        result.failed[row.study_uid] = StudyFailure(row.error_code or "", row.reason or "", False)
        return True
    return False


def _manifests(batch: _Batch, inputs: Mapping[str, StudyManifestInput],
               rows: Mapping[str, LedgerRow]) -> list[Manifest]:
    """The KOS of each study still to send; the others are counted (unchanged, done earlier in this
    run) or recorded failed (no manifest possible)."""
    out = []
    for uid, inp in inputs.items():
        digest = content_hash(inp, batch.xdsi)
        if _earlier_in_run(rows.get(uid), digest, batch.run_id, batch.result):
            continue
        if uid in rows and rows[uid].content_hash == digest:
            batch.result.unchanged.append(uid)
            continue
        try:
            out.append(build_manifest(inp, batch.xdsi))
        except ManifestError as exc:
            log.warning("study %s: no manifest: %s", uid, exc)
            batch.failed(uid, digest, StudyFailure(type(exc).__name__, error_text(exc), False))
    return out


def _with_consent(batch: _Batch, manifests: list[Manifest]) -> list[Manifest]:
    """With ``xdsi.consent_required``: the manifests whose patient has consented; the others pending."""
    if not batch.xdsi.consent_required:
        return manifests
    consented = batch.ledger.has_consent({m.patient_pseudo_id for m in manifests})
    waiting = [m for m in manifests if m.patient_pseudo_id not in consented]
    if waiting:
        batch.ledger.mark_pending([(m.study_uid, m.content_hash, NO_CONSENT) for m in waiting], batch.run_id)
        batch.result.pending_consent += [m.study_uid for m in waiting]
    return [m for m in manifests if m.patient_pseudo_id in consented]


def _submit(client: RepositoryClient, batch: _Batch, manifest: Manifest, replaces: str | None,
            now: Callable[[], datetime]) -> None:
    """Send one manifest and record the outcome; XdsUnavailable / XdsConfigurationError propagate."""
    submission = build_request(manifest, batch.xdsi, submitted=now(), replaces=replaces)
    try:
        client.provide_and_register(submission.request, manifest.part10)
    except XdsRegistryError as exc:
        audit_submission(batch.audit, batch.xdsi, manifest, submission, success=False)
        if exc.code == ALREADY_REGISTERED:
            log.info("study %s: the registry already holds KOS %s", manifest.study_uid, manifest.sop_instance_uid)
            batch.published(manifest, submission, replaces)
            return
        log.warning("study %s: refused by the registry: %s", manifest.study_uid, exc)
        batch.failed(manifest.study_uid, manifest.content_hash,
                     StudyFailure(exc.code or type(exc).__name__, error_text(exc), False))
        return
    audit_submission(batch.audit, batch.xdsi, manifest, submission, success=True)
    batch.published(manifest, submission, replaces)


def publish_batch(client: RepositoryClient, ledger: XdsiLedger, con: duckdb.DuckDBPyConnection,
                  xdsi: XdsiSettings, study_uids: Sequence[str], *, run_id: str,
                  now: Callable[[], datetime] = _now) -> BatchResult:
    """Build, check consent, send and record one batch of (due) studies, each on its own: a manifest
    or registry error fails that study only. When the repository is unavailable or misconfigured, the
    studies not sent yet are recorded failed (transient) and the error is raised after recording."""
    batch = _Batch(ledger, xdsi, run_id)
    inputs = load_inputs(con, study_uids)
    rows = ledger.entries(inputs)
    manifests = _with_consent(batch, _manifests(batch, inputs, rows))
    requests_before = client.requests
    batch.audit = AuditLog.from_settings(xdsi) if manifests else None
    try:
        for i, manifest in enumerate(manifests):
            try:
                row = rows.get(manifest.study_uid)
                _submit(client, batch, manifest, row.entry_uuid if row else None, now)
            except (XdsUnavailable, XdsConfigurationError) as exc:
                failure = StudyFailure(type(exc).__name__, error_text(exc), True)
                for unsent in manifests[i:]:
                    batch.failed(unsent.study_uid, unsent.content_hash, failure)
                raise
    finally:
        batch.result.requests = client.requests - requests_before
        if batch.audit is not None:
            batch.audit.close()
    return batch.result


def publish_catalog_batch(client: RepositoryClient, ledger: XdsiLedger, catalog: Catalog, xdsi: XdsiSettings,
                          study_uids: Sequence[str], *, run_id: str) -> BatchResult:
    """:func:`publish_batch` over its own connection to ``catalog`` (a root, or an opened store)."""
    with closing(connect_catalog(catalog)) as con:
        return publish_batch(client, ledger, con, xdsi, study_uids, run_id=run_id)


# -- whole runs ------------------------------------------------------------------------------------
@dataclass
class PublishReport:
    """Counts and per-study failures of one publish run (catalog study UIDs and one-line reasons only).

    ``published`` counts first publications, ``replaced`` the replacements (RPLC) of changed studies.
    """

    run_id: str
    selected: int = 0
    published: int = 0
    replaced: int = 0
    unchanged: int = 0
    refused_before: int = 0  # refused by the registry in an earlier run, unchanged since: not sent again
    pending_consent: int = 0
    failed: dict[str, StudyFailure] = field(default_factory=dict)
    not_attempted: int = 0
    #: requests to the repository, retries included; in a flow, those of a batch that stopped the
    #: run are not known (its task raised instead of returning)
    requests: int = 0
    aborted: str | None = None
    seconds: float = 0.0

    def add(self, batch: BatchResult) -> None:
        self.published += len(batch.published)
        self.replaced += len(batch.replaced)
        self.unchanged += len(batch.unchanged)
        self.pending_consent += len(batch.pending_consent)
        self.failed.update(batch.failed)
        self.requests += batch.requests

    @property
    def ok(self) -> bool:
        """Nothing failed and the run reached its end (pending consent is not a failure)."""
        return not self.failed and self.aborted is None

    def failed_by_code(self) -> dict[str, int]:
        return dict(sorted(Counter(f.code for f in self.failed.values()).items()))

    def message(self) -> str:
        """One line, for logs and the flow run's state."""
        text = (f"{self.published + self.replaced} of {self.selected} studies published ({self.replaced} replaced), "
                f"{self.unchanged} unchanged, {self.pending_consent} pending consent, {len(self.failed)} failed")
        if self.refused_before:
            text += f", {self.refused_before} refused before and not sent again (pacsflow xdsi status --failed)"
        if self.failed:
            text += " (" + ", ".join(f"{n} {code}" for code, n in self.failed_by_code().items()) + ")"
        if self.aborted:
            text += f"; stopped: {self.aborted}; {self.not_attempted} not attempted"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "selected": self.selected, "published": self.published, "replaced": self.replaced,
            "unchanged": self.unchanged, "refused_before": self.refused_before, "pending_consent": self.pending_consent,
            "failed": len(self.failed),
            "failed_by_code": self.failed_by_code(), "not_attempted": self.not_attempted, "requests": self.requests,
            "aborted": self.aborted, "seconds": self.seconds,
            "failures": {uid: f.reason for uid, f in sorted(self.failed.items())},
        }

    def markdown(self, title: str = "XDS-I.b publish", limit: int = 200) -> str:
        lines = [f"# {title} {self.run_id}", "", self.message(), "", "| measure | value |", "|---|---|"]
        for key in ("selected", "published", "replaced", "unchanged", "refused_before", "pending_consent",
                    "not_attempted", "requests", "seconds"):
            lines.append(f"| {key} | {getattr(self, key)} |")
        lines += [f"| failed: {code} | {n} |" for code, n in self.failed_by_code().items()]
        if self.failed:
            lines += ["", "## Failed studies", "", "| study | error code | next run | reason |", "|---|---|---|---|"]
            rows = [f"| {uid} | {f.code} | {'tries again' if f.transient else 'only if changed or --only-failed'} | "
                    f"{cell(f.reason)} |" for uid, f in sorted(self.failed.items())]
            lines += rows[:limit] + ([f"| … | | | {len(rows) - limit} more |"] if len(rows) > limit else [])
        return "\n".join(lines)


#: Publish one batch and record it: (study UIDs, run id, batch number) → its result. Raises
#: XdsUnavailable / XdsConfigurationError when the run must stop.
SubmitStep = Callable[[list[str], str, int], BatchResult]


def run_publish(xdsi: XdsiSettings, catalog: Catalog, ledger: XdsiLedger, submit_step: SubmitStep,
                study_uids: Sequence[str] | None = None, *, only_failed: bool = False,
                logger: logging.Logger | logging.LoggerAdapter = log) -> PublishReport:
    """The publish loop, for flows and plain callers alike: check the settings, plan (all of the
    catalog or ``study_uids``; ``only_failed``: the ledger's failed studies), send the due studies
    batch by batch with ``submit_step`` until the repository is unavailable or refuses the
    configuration, then report. Study failures are in the report and the ledger, never raised;
    XdsConfigurationError is raised when a setting is missing (nothing is sent then)."""
    check_publishable(xdsi)
    started = time.monotonic()
    report = PublishReport(new_run_id())
    with closing(connect_catalog(catalog)) as con:
        plan = plan_publish(con, ledger, xdsi, study_uids, only_failed=only_failed)
    report.selected, report.unchanged, report.refused_before = plan.selected, plan.unchanged, plan.refused_before
    batches = plan.batches()
    for i, batch in enumerate(batches):
        try:
            result = submit_step(list(batch), report.run_id, i)
        except (XdsUnavailable, XdsConfigurationError) as exc:
            report.aborted = error_text(exc)
            done, untouched = _stopped_batch(ledger, batch, report.run_id)
            report.add(done)
            rest = {**untouched, **{uid: h for later in batches[i + 1 :] for uid, h in later.items()}}
            _not_attempted(ledger, rest, report.run_id, report.aborted)
            report.not_attempted = len(rest)
            logger.warning("XDS-I.b publish stopped: %s; %d studies not attempted", report.aborted, len(rest))
            break
        report.add(result)
    report.seconds = round(time.monotonic() - started, 2)
    (logger.info if report.ok else logger.warning)("XDS-I.b publish %s: %s (%.1f s)", report.run_id,
                                                   report.message(), report.seconds)
    return report


def _stopped_batch(ledger: XdsiLedger, batch: Mapping[str, str], run_id: str) -> tuple[BatchResult, dict[str, str]]:
    """What this run did to the studies of the batch that stopped it, from the ledger (a step retried
    by Prefect may have sent some before it gave up), and the studies it did not touch."""
    result, untouched = BatchResult(), {}
    rows = ledger.entries(batch)
    for uid, digest in batch.items():
        row = rows.get(uid)
        if row is None or row.run_id != run_id:
            untouched[uid] = digest
        elif row.status is PublishStatus.PUBLISHED:
            (result.replaced if row.replaced_entry_uuid else result.published).append(uid)
        elif row.status is PublishStatus.FAILED:
            result.failed[uid] = StudyFailure(row.error_code or "", row.reason or "", row.transient)
        else:
            result.pending_consent.append(uid)
    return result, untouched


def _not_attempted(ledger: XdsiLedger, studies: Mapping[str, str], run_id: str, reason: str) -> None:
    """Studies a stopped run did not reach are recorded pending, so the next run (the nightly one
    included) sends them; a failed study keeps its failure."""
    rows = ledger.entries(studies)
    ledger.mark_pending([(uid, digest, f"not attempted: {reason}") for uid, digest in studies.items()
                         if uid not in rows or rows[uid].status is not PublishStatus.FAILED], run_id)


def publish_catalog(settings: Settings, study_uids: Sequence[str] | None = None, *, only_failed: bool = False,
                    client: RepositoryClient | None = None) -> PublishReport:
    """:func:`run_publish` without Prefect: every batch calls :func:`publish_batch` in this process,
    over ``client`` (default: one :class:`.client.XdsRepositoryClient` for the run)."""
    xdsi, catalog = settings.xdsi, settings.catalog.reader(settings.catalog_root)
    ledger = XdsiLedger.under(settings.state_root, settings.state.url)
    check_publishable(xdsi)
    opened = XdsRepositoryClient.from_settings(xdsi) if client is None else nullcontext(client)  # a caller's stays open
    with opened as connected:
        def submit_step(batch: list[str], run_id: str, _batch_no: int) -> BatchResult:
            return publish_catalog_batch(connected, ledger, catalog, xdsi, batch, run_id=run_id)

        before = connected.requests
        report = run_publish(xdsi, catalog, ledger, submit_step, study_uids, only_failed=only_failed)
        report.requests = connected.requests - before  # the batch that stopped the run included
        return report
