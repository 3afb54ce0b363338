"""FHIR sync: catalog rows → ``ImagingStudy`` + ``Patient`` on the FHIR server, in transaction Bundles.

Plain functions over the pure mapping (:mod:`.mapping`) and the one network boundary
(:mod:`.client`): ``sync_batch`` (one batch), ``reconcile`` (catalog counts against the server) and
:func:`run_sync`, the one sync loop. The loop takes the per-batch and reconciliation steps as
callables: :func:`sync_catalog` passes steps that call ``sync_batch`` / ``reconcile`` directly (no
Prefect); :func:`pacsflow.tasks.fhir.steps.sync_with_tasks`, which the flows run, passes the
Prefect tasks ``fhir-sync`` and ``fhir-reconcile`` that call the same functions.

* **Source**: the catalog only (de-identified header metadata): a sync never touches DICOM, so it
  can be replayed at any time (``fhir-resync``).
* **Idempotent**: every entry is a conditional update (``PUT ImagingStudy?identifier=urn:dicom:uid|…``,
  ``PUT Patient?identifier=<pseudonym system>|…``); a patient shared by several studies of a batch
  is one entry. Replays leave one ImagingStudy per study and one Patient per pseudonym; HAPI answers a
  race between two writers with 409 for the loser, which the client retries (then it matches).
* **Patients are merged, not replaced**: the batch's Patients are read first (one search) and ours
  merged into those that exist, written by id with ``ifMatch``: what an HL7 ADT message (or anyone)
  gave a Patient stays, and one written meanwhile is read and merged again.
* **Ledger** (``state_root/fhir_sync.sqlite``): per study, the content hash last sent, status and
  reason. Unchanged studies are skipped; failed ones are sent again on the next run.
* **Bad entries**: a transaction is all or nothing. When the server rejects a Bundle (4xx, or 409
  that retries did not resolve), the batch is split in halves until the bad study is alone; the good
  studies land and the bad one is recorded failed with the server's OperationOutcome (redacted).
* **Server down**: 429/5xx/network errors are retried by the client (backoff, Retry-After); when they
  persist the batch's studies are recorded failed (transient), later batches are not attempted, and
  the next run sends them.
* **Reconciliation**: per study, the catalog's number_of_series / number_of_instances against the
  server's ImagingStudy; a difference is reported and the study marked for re-sending.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from pacsflow.catalog.views import Catalog, connect as connect_catalog
from pacsflow.tasks.core.clock import new_run_id
from pacsflow.tasks.core.markdown import cell
from pacsflow.tasks.core.errors import (
    FhirConfigurationError,
    FhirConflict,
    FhirMappingError,
    FhirRejected,
    FhirUnavailable,
    error_text,
    is_transient,
)
from pacsflow.tasks.fhir.client import FhirClient
from pacsflow.tasks.fhir.ledger import FhirSyncLedger
from pacsflow.tasks.fhir.mapping import (
    Identity,
    MappingOptions,
    StudyResources,
    build_study,
    study_identity,
    transaction_bundle,
)
from pacsflow.tasks.settings import FhirSettings, Settings

log = logging.getLogger(__name__)

#: Upper bound of instances per Bundle (ImagingStudy lists every instance: ~200 bytes each).
MAX_INSTANCES_PER_BUNDLE = 20_000


# -- catalog --------------------------------------------------------------------------------------
# Constant SQL; every value is a bound parameter. Batches follow the patient: a patient's studies
# land in one Bundle (one Patient entry for all of them) unless they outgrow it.
_SQL_STUDY_SIZES = ("SELECT study_uid, number_of_instances FROM studies "
                    "ORDER BY patient_pseudo_id, study_uid")
_SQL_STUDY_SIZES_IN = ("SELECT study_uid, number_of_instances FROM studies "
                       "WHERE study_uid IN (SELECT unnest(?::VARCHAR[])) ORDER BY patient_pseudo_id, study_uid")
_SQL_STUDIES = ("SELECT study_uid, patient_pseudo_id, study_date, study_time, study_description, modalities, "
                "number_of_series, number_of_instances, patient_sex FROM studies "
                "WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))")
_SQL_SERIES = ("SELECT study_uid, series_uid, series_number, modality, series_description, body_part_examined, "
               "laterality, series_date, series_time, number_of_instances FROM series "
               "WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))")
_SQL_INSTANCES = ("SELECT study_uid, series_uid, sop_instance_uid, sop_class_uid, instance_number, image_type "
                  "FROM instances WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))")
_SQL_COUNTS = ("SELECT study_uid, number_of_series, number_of_instances FROM studies "
               "WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))")


StudyRows = tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]


def load_study_rows(con: duckdb.DuckDBPyConnection, study_uids: Sequence[str]) -> dict[str, StudyRows]:
    """The studies / series / instances rows of these studies (absent UIDs are left out)."""
    uids = list(study_uids)
    out: dict[str, StudyRows] = {}
    for row in con.sql(_SQL_STUDIES, params=[uids]).to_arrow_table().to_pylist():
        out[row["study_uid"]] = (row, [], [])
    for row in con.sql(_SQL_SERIES, params=[uids]).to_arrow_table().to_pylist():
        if row["study_uid"] in out:
            out[row["study_uid"]][1].append(row)
    for row in con.sql(_SQL_INSTANCES, params=[uids]).to_arrow_table().to_pylist():
        if row["study_uid"] in out:
            out[row["study_uid"]][2].append(row)
    return out


def catalog_study_uids(rows_dirs: Iterable[str | Path]) -> list[str]:
    """The catalog StudyInstanceUIDs in per-study row folders written by ``process_study`` (what a
    nightly commit just added). Under Retain UIDs these differ from the pseudonymous study refs."""
    import pyarrow.parquet as pq

    uids: list[str] = []
    for d in rows_dirs:
        table = pq.read_table(Path(d) / "studies.parquet", columns=["study_uid"])
        uids.extend(str(u) for u in table.column("study_uid").to_pylist() if u)
    return uids


def plan_batches(
    con: duckdb.DuckDBPyConnection,
    ledger: FhirSyncLedger,
    study_uids: Sequence[str] | None = None,
    *,
    only_failed: bool = False,
    batch_size: int = 50,
    max_instances: int = MAX_INSTANCES_PER_BUNDLE,
) -> list[list[str]]:
    """The studies to consider (all of the catalog, the given ones, or those the ledger has failed),
    in batches of at most ``batch_size`` studies and about ``max_instances`` instances, in patient
    order (fewer Patient entries: the server writes each patient once per Bundle)."""
    if study_uids is not None and not study_uids:
        return []
    if study_uids is None:
        sizes = con.execute(_SQL_STUDY_SIZES).fetchall()
    else:
        sizes = con.execute(_SQL_STUDY_SIZES_IN, [sorted(set(study_uids))]).fetchall()
    if only_failed:
        failed = set(ledger.failed())
        sizes = [s for s in sizes if s[0] in failed]
    batches: list[list[str]] = []
    current: list[str] = []
    weight = 0
    for uid, n in sizes:
        n = int(n or 0)
        if current and (len(current) >= batch_size or weight + n > max_instances):
            batches.append(current)
            current, weight = [], 0
        current.append(uid)
        weight += n
    if current:
        batches.append(current)
    return batches


# -- one batch -----------------------------------------------------------------------------------
@dataclass
class BatchResult:
    """What happened to the studies of one batch (study UIDs and redacted reasons only)."""

    sent: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    transactions: int = 0


def _server_ids(response: dict[str, Any], bundle: dict[str, Any]) -> dict[str, str]:
    """fullUrl of each ImagingStudy entry → the server's resource id (from the response location)."""
    ids = {}
    for req, res in zip(bundle["entry"], response.get("entry", []), strict=False):
        if req["resource"].get("resourceType") != "ImagingStudy":
            continue
        location = (res.get("response") or {}).get("location") or ""
        parts = location.split("/")
        if len(parts) >= 2 and parts[0] == "ImagingStudy":
            ids[req["fullUrl"]] = parts[1]
    return ids


@dataclass
class SendOutcome:
    """What the server committed: (study_uid, hash, server id) per sent study, (study_uid, reason,
    transient) per rejected one, and the number of transactions it took."""

    synced: list[tuple[str, str, str | None]] = field(default_factory=list)
    failed: list[tuple[str, str, bool]] = field(default_factory=list)
    transactions: int = 0

    def done(self) -> set[str]:
        """The studies with an outcome (committed or rejected)."""
        return {u for u, _, _ in self.synced} | {u for u, _, _ in self.failed}


#: Reads and merges of a batch's Patients when another writer keeps changing one of them.
VERSION_ROUNDS = 3

# HAPI's "client-assigned ID constraint failure": our id belongs to a resource deleted on the server.
_ID_TAKEN = "HAPI-0825"


def _transaction(client: FhirClient, bundle: dict[str, Any],
                 outcome: SendOutcome) -> dict[str, Any] | FhirRejected | FhirConflict:
    """The server's answer to ``bundle``, or the rejection when it committed none of it.
    FhirConfigurationError (a FhirRejected no split can fix) and FhirUnavailable propagate."""
    outcome.transactions += 1
    try:
        return client.transaction(bundle)
    except FhirConfigurationError:
        raise
    except (FhirRejected, FhirConflict) as exc:
        return exc


def _revive(client: FhirClient, study: StudyResources, outcome: SendOutcome, conflict: FhirConflict,
            existing: Mapping[Identity, dict[str, Any]]) -> FhirRejected | FhirConflict | None:
    """The conditional update of this study found no match but could not create it under our id,
    because a deleted resource holds that id (HAPI keeps it). Write the resources that have no match
    by id instead (``PUT Type/id`` revives them as a new version). None when that landed, else the
    error to record."""
    identities = [(study.patient_identity, study.patient), (study.endpoint_identity, study.endpoint),
                  (study.study_identity, study.imaging_study)]
    by_id = {identity for identity, resource in identities
             if identity is not None and getattr(resource, "id", None)
             and not client.search_by_identifier(identity.resource_type, [identity.token], elements=["id"])}
    if not by_id:
        return conflict
    bundle = transaction_bundle([study], by_id=by_id, existing=existing)
    answer = _transaction(client, bundle, outcome)
    if isinstance(answer, BaseException):
        return answer
    log.info("study %s: revived on the FHIR server under its deleted id", study.study_uid)
    server_id = _server_ids(answer, bundle).get(study.study_identity.full_url)
    outcome.synced.append((study.study_uid, study.hash, server_id))
    return None


def existing_patients(client: FhirClient, studies: Sequence[StudyResources]) -> dict[Identity, dict[str, Any]]:
    """The Patients the server holds for these studies, by identity: one search for the batch. An
    identity that two resources carry is left out (its conditional update reports the ambiguity)."""
    wanted = {s.patient_identity.token: s.patient_identity for s in studies}
    found: dict[Identity, list[dict[str, Any]]] = {}
    for res in client.search_by_identifier("Patient", list(wanted), chunk=max(len(wanted), 1)):
        for token in {f"{i.get('system')}|{i.get('value')}" for i in res.get("identifier", [])} & wanted.keys():
            found.setdefault(wanted[token], []).append(res)
    return {identity: hits[0] for identity, hits in found.items() if len(hits) == 1}


def _version_conflict(answer: object, bundle: dict[str, Any]) -> bool:
    """A Patient written with ``ifMatch`` changed since it was read (the HL7 drain wrote it)."""
    if not any("ifMatch" in e["request"] for e in bundle["entry"]):
        return False
    if isinstance(answer, FhirConflict):
        return _ID_TAKEN not in str(answer)
    return isinstance(answer, FhirRejected) and answer.status == 412


def send_studies(client: FhirClient, studies: Sequence[StudyResources], outcome: SendOutcome | None = None,
                 existing: Mapping[Identity, dict[str, Any]] | None = None) -> SendOutcome:
    """One transaction for ``studies``; when the server rejects it (4xx, or 409 that retries did not
    resolve), halves it until the bad study is alone, so the others land.

    The batch's Patients are read first (``existing``, one search) and ours merged into them, so
    what another writer gave a Patient stays (:func:`transaction_bundle`); when one of them changed
    before the transaction, they are read and merged again (a few rounds).
    FhirUnavailable and FhirConfigurationError propagate (nothing here can fix them); what was
    committed before is in ``outcome`` (pass one in to keep it).
    """
    outcome = outcome if outcome is not None else SendOutcome()
    if not studies:
        return outcome
    for _ in range(VERSION_ROUNDS):
        existing = existing_patients(client, studies) if existing is None else existing
        bundle = transaction_bundle(studies, existing=existing)
        answer = _transaction(client, bundle, outcome)
        if not _version_conflict(answer, bundle):
            break
        existing = None
    if not isinstance(answer, BaseException):
        ids = _server_ids(answer, bundle)
        outcome.synced += [(st.study_uid, st.hash, ids.get(st.study_identity.full_url)) for st in studies]
        return outcome
    rejection: FhirRejected | FhirConflict | None = answer
    if len(studies) == 1 and isinstance(answer, FhirConflict) and _ID_TAKEN in str(answer):
        rejection = _revive(client, studies[0], outcome, answer, existing or {})
    if rejection is None:
        return outcome
    if len(studies) == 1:
        reason = error_text(rejection)
        outcome.failed.append((studies[0].study_uid, reason, is_transient(rejection)))
        log.warning("study %s: FHIR server rejected it: %s", studies[0].study_uid, reason)
        return outcome
    log.info("FHIR transaction of %d studies rejected (%s); splitting it", len(studies), type(rejection).__name__)
    mid = len(studies) // 2
    send_studies(client, studies[:mid], outcome, existing)
    send_studies(client, studies[mid:], outcome, existing)
    return outcome


def _changed_studies(con: duckdb.DuckDBPyConnection, ledger: FhirSyncLedger, study_uids: Sequence[str],
                     options: MappingOptions, force: bool) -> tuple[list[StudyResources], list[str], SendOutcome]:
    """Map the batch: the studies to send, those unchanged since their last sync (skipped unless
    ``force``), and an outcome that already holds those that cannot be sent (not in the catalog, not
    mappable: permanent failures)."""
    rows = load_study_rows(con, study_uids)
    prior = ledger.entries(study_uids)
    to_send: list[StudyResources] = []
    skipped: list[str] = []
    unsendable = SendOutcome()
    for uid in study_uids:
        if uid not in rows:
            unsendable.failed.append((uid, "not in the catalog", False))
            continue
        try:
            built = build_study(*rows[uid], options)
        except FhirMappingError as exc:
            unsendable.failed.append((uid, error_text(exc), False))
            log.warning("study %s: not mapped to FHIR: %s", uid, exc)
            continue
        last = prior.get(uid)
        if not force and last is not None and last.status == "synced" and last.synced_hash == built.hash:
            skipped.append(uid)
        else:
            to_send.append(built)
    return to_send, skipped, unsendable


def sync_batch(
    client: FhirClient,
    ledger: FhirSyncLedger,
    con: duckdb.DuckDBPyConnection,
    study_uids: Sequence[str],
    options: MappingOptions,
    *,
    run_id: str,
    force: bool = False,
) -> BatchResult:
    """Map, skip unchanged, send, and record one batch of studies in the ledger.

    Per-study problems (mapping errors, rejected entries) are recorded and returned. When the server
    is unavailable or misconfigured, the studies not yet sent are recorded failed and the error
    (FhirUnavailable / FhirConfigurationError) is raised after recording.
    """
    to_send, skipped, outcome = _changed_studies(con, ledger, study_uids, options, force)
    try:
        send_studies(client, to_send, outcome)
    except (FhirUnavailable, FhirConfigurationError) as exc:
        done = outcome.done()
        outcome.failed += [(st.study_uid, error_text(exc), is_transient(exc))
                           for st in to_send if st.study_uid not in done]
        raise
    finally:
        if outcome.synced:
            ledger.mark_synced(outcome.synced, run_id)
        if outcome.failed:
            ledger.mark_failed(outcome.failed, run_id)
    return BatchResult(sent=[u for u, _, _ in outcome.synced], skipped=skipped,
                       failed={u: reason for u, reason, _ in outcome.failed}, transactions=outcome.transactions)


def sync_catalog_batch(client: FhirClient, ledger: FhirSyncLedger, catalog: Catalog, study_uids: Sequence[str],
                       options: MappingOptions, *, run_id: str, force: bool = False) -> BatchResult:
    """:func:`sync_batch` over its own connection to ``catalog`` (a catalog root, or the store that
    ``settings.catalog.reader`` gives for the configured backend)."""
    with closing(connect_catalog(catalog)) as con:
        return sync_batch(client, ledger, con, study_uids, options, run_id=run_id, force=force)


# -- reconciliation --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Difference:
    study_uid: str
    field: str  # "missing" | "duplicates" | "numberOfSeries" | "numberOfInstances"
    catalog: int | None
    server: int | None

    def text(self) -> str:
        if self.field == "missing":
            return "no ImagingStudy on the server"
        if self.field == "duplicates":
            return f"{self.server} ImagingStudy resources with this identifier"
        return f"{self.field}: catalog {self.catalog}, server {self.server}"


def reconcile(client: FhirClient, con: duckdb.DuckDBPyConnection, study_uids: Sequence[str],
              chunk: int = 50) -> list[Difference]:
    """Catalog counts against the server's ImagingStudy, per study: the differences."""
    diffs: list[Difference] = []
    uids = list(study_uids)
    for i in range(0, len(uids), chunk):
        part = uids[i : i + chunk]
        counts = {r[0]: (r[1], r[2]) for r in con.execute(_SQL_COUNTS, [part]).fetchall()}
        found = _server_studies(client, part, chunk)
        for uid in part:
            if uid in counts:
                diffs += _differences(uid, counts[uid], found.get(uid, []))
    return diffs


def _server_studies(client: FhirClient, study_uids: Sequence[str], chunk: int) -> dict[str, list[dict[str, Any]]]:
    """Per study, the server's ImagingStudy resources with its identifier (their counts only)."""
    tokens = {study_identity(u).token: u for u in study_uids}
    found: dict[str, list[dict[str, Any]]] = {}
    for res in client.search_by_identifier("ImagingStudy", list(tokens), chunk=chunk,
                                           elements=["identifier", "numberOfSeries", "numberOfInstances"]):
        for ident in res.get("identifier", []):
            uid = tokens.get(f"{ident.get('system')}|{ident.get('value')}")
            if uid is not None:
                found.setdefault(uid, []).append(res)
    return found


def _differences(uid: str, counts: tuple[int, int], hits: list[dict[str, Any]]) -> list[Difference]:
    if not hits:
        return [Difference(uid, "missing", None, None)]
    diffs = [Difference(uid, "duplicates", 1, len(hits))] if len(hits) > 1 else []
    for name, expected in zip(("numberOfSeries", "numberOfInstances"), counts, strict=True):
        if hits[0].get(name) != expected:
            diffs.append(Difference(uid, name, expected, hits[0].get(name)))
    return diffs


def reconcile_catalog(client: FhirClient, catalog: Catalog, study_uids: Sequence[str]) -> list[Difference]:
    """:func:`reconcile` over its own connection to ``catalog`` (a root or an opened store)."""
    with closing(connect_catalog(catalog)) as con:
        return reconcile(client, con, study_uids)


def mark_differences(ledger: FhirSyncLedger, diffs: Sequence[Difference], run_id: str) -> None:
    """Studies that differ are sent again on the next run (failed, transient)."""
    by_uid: dict[str, list[str]] = {}
    for d in diffs:
        by_uid.setdefault(d.study_uid, []).append(d.text())
    if by_uid:
        ledger.mark_failed([(uid, "reconciliation: " + "; ".join(t), True) for uid, t in by_uid.items()], run_id)


# -- whole runs ----------------------------------------------------------------------------------
@dataclass
class SyncReport:
    """Counts and per-study outcomes of one sync run (study UIDs and redacted reasons only)."""

    run_id: str
    selected: int = 0
    sent: int = 0
    skipped_unchanged: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    not_attempted: int = 0
    transactions: int = 0
    differences: list[Difference] = field(default_factory=list)
    aborted: str | None = None
    seconds: float = 0.0

    def add(self, batch: BatchResult) -> None:
        self.sent += len(batch.sent)
        self.skipped_unchanged += len(batch.skipped)
        self.failed.update(batch.failed)
        self.transactions += batch.transactions

    def log_summary(self, logger: logging.Logger | logging.LoggerAdapter) -> None:
        logger.info("FHIR sync %s: %d selected, %d sent, %d unchanged, %d failed, %d differences in %.1f s",
                    self.run_id, self.selected, self.sent, self.skipped_unchanged, len(self.failed),
                    len(self.differences), self.seconds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "selected": self.selected, "sent": self.sent,
            "skipped_unchanged": self.skipped_unchanged, "failed": len(self.failed),
            "not_attempted": self.not_attempted, "transactions": self.transactions,
            "differences": len(self.differences), "aborted": self.aborted, "seconds": self.seconds,
            "failures": dict(self.failed),
            "reconciliation": [asdict(d) for d in self.differences],
        }

    def markdown(self, title: str = "FHIR sync") -> str:
        lines = [f"# {title} {self.run_id}", "", "| measure | value |", "|---|---|"]
        for key in ("selected", "sent", "skipped_unchanged", "not_attempted", "transactions", "seconds"):
            lines.append(f"| {key} | {getattr(self, key)} |")
        lines += [f"| failed | {len(self.failed)} |", f"| differences | {len(self.differences)} |"]
        if self.aborted:
            lines += ["", f"**Stopped early:** {cell(self.aborted)}"]
        if self.failed:
            lines += ["", "## Failed studies", "", "| study | reason |", "|---|---|"]
            lines += _md_rows([f"| {uid} | {cell(reason)} |" for uid, reason in sorted(self.failed.items())])
        if self.differences:
            lines += ["", "## Reconciliation: catalog vs server", "", "| study | difference |", "|---|---|"]
            lines += _md_rows([f"| {d.study_uid} | {cell(d.text())} |" for d in self.differences])
        return "\n".join(lines)


def _md_rows(rows: list[str], limit: int = 200) -> list[str]:
    return rows[:limit] + ([f"| … | {len(rows) - limit} more |"] if len(rows) > limit else [])


#: Sync one batch and record it in the ledger: (study UIDs, run id, batch number) → its result.
#: Raises FhirUnavailable / FhirConfigurationError when the run must stop.
BatchStep = Callable[[list[str], str, int], BatchResult]
#: Catalog counts against the server for these studies (not recorded: the loop marks them).
ReconcileStep = Callable[[list[str]], list[Difference]]


def run_sync(
    fhir: FhirSettings,
    catalog: Catalog,
    ledger: FhirSyncLedger,
    sync_step: BatchStep,
    reconcile_step: ReconcileStep,
    study_uids: Sequence[str] | None = None,
    *,
    only_failed: bool = False,
    reconcile_after: bool = True,
    logger: logging.Logger | logging.LoggerAdapter = log,
) -> SyncReport:
    """The FHIR sync loop, for flows and plain callers alike: plan the batches (all of the catalog,
    ``study_uids``, or with ``only_failed`` what the ledger has failed), sync them in order with
    ``sync_step`` until the server is unavailable or misconfigured, reconcile what is on the server
    with ``reconcile_step`` and mark the differences for re-sending, then report. FHIR failures
    are in the report (and the ledger), never raised."""
    started = time.monotonic()
    report = SyncReport(new_run_id())
    if fhir.identified_sync:
        logger.warning("fhir.identified_sync is on: resources may carry identifying data; the FHIR server "
                       "and its logs are a PHI zone")
    if not fhir.base_url:
        report.aborted = "fhir.base_url is not set"
    else:
        with closing(connect_catalog(catalog)) as con:
            batches = plan_batches(con, ledger, study_uids, only_failed=only_failed, batch_size=fhir.batch_size)
        report.selected = sum(len(b) for b in batches)
        on_server = _sync_batches(batches, sync_step, ledger, report, logger)
        if reconcile_after and on_server and report.aborted is None:
            _reconcile(on_server, reconcile_step, ledger, report)
    report.seconds = round(time.monotonic() - started, 2)
    report.log_summary(logger)
    return report


def _sync_batches(batches: list[list[str]], sync_step: BatchStep, ledger: FhirSyncLedger, report: SyncReport,
                  logger: logging.Logger | logging.LoggerAdapter) -> list[str]:
    """Each batch in order, into ``report``, until one stops the run; the studies now on the server."""
    on_server: list[str] = []
    for i, batch in enumerate(batches):
        try:
            result = sync_step(batch, report.run_id, i)
        except (FhirUnavailable, FhirConfigurationError) as exc:
            report.aborted = error_text(exc)
            result, untouched = _stopped_batch(ledger, batch, report.run_id, report.aborted)
            report.add(result)
            report.not_attempted = untouched + sum(len(b) for b in batches[i + 1 :])
            logger.warning("FHIR sync stopped: %s; %d studies not attempted", report.aborted, report.not_attempted)
            break
        report.add(result)
        on_server += result.sent + result.skipped
    return on_server


def _stopped_batch(ledger: FhirSyncLedger, batch: Sequence[str], run_id: str,
                   reason: str) -> tuple[BatchResult, int]:
    """What this run did to the studies of the batch that stopped it, from the ledger (a step retried
    by Prefect may have sent some before it gave up), and how many it did not touch."""
    rows = ledger.entries(batch)
    result = BatchResult()
    untouched = 0
    for uid in batch:
        row = rows.get(uid)
        if row is None or row.run_id != run_id:
            untouched += 1
        elif row.status == "failed":
            result.failed[uid] = row.reason or reason
        else:
            result.sent.append(uid)
    return result, untouched


def _reconcile(study_uids: list[str], reconcile_step: ReconcileStep, ledger: FhirSyncLedger,
               report: SyncReport) -> None:
    try:
        report.differences = reconcile_step(study_uids)
    except (FhirUnavailable, FhirConflict, FhirRejected) as exc:
        report.aborted = f"reconciliation: {error_text(exc)}"
        return
    mark_differences(ledger, report.differences, report.run_id)


def sync_catalog(
    settings: Settings,
    study_uids: Sequence[str] | None = None,
    *,
    only_failed: bool = False,
    force: bool = False,
    reconcile_after: bool = True,
) -> SyncReport:
    """:func:`run_sync` without Prefect: every batch and the reconciliation call :func:`sync_batch`
    and :func:`reconcile` in this process, over one client. ``force`` sends unchanged studies too."""
    fhir, catalog = settings.fhir, settings.catalog.reader(settings.catalog_root)
    ledger = FhirSyncLedger.under(settings.state_root, settings.state.url)
    options = MappingOptions.from_settings(fhir)
    with _run_client(fhir) as connected:
        def sync_step(batch: list[str], run_id: str, _batch_no: int) -> BatchResult:
            return sync_catalog_batch(connected(), ledger, catalog, batch, options, run_id=run_id, force=force)

        def reconcile_step(uids: list[str]) -> list[Difference]:
            return reconcile_catalog(connected(), catalog, uids)

        return run_sync(fhir, catalog, ledger, sync_step, reconcile_step, study_uids,
                        only_failed=only_failed, reconcile_after=reconcile_after)


@contextmanager
def _run_client(fhir: FhirSettings) -> Iterator[Callable[[], FhirClient]]:
    """One client for the whole run, made by the first step that needs it: a configuration error
    then stops the run in its first batch, as it does in a flow's ``fhir-sync`` task."""
    made: list[FhirClient] = []

    def connected() -> FhirClient:
        if not made:
            made.append(FhirClient.from_settings(fhir))
        return made[0]

    try:
        yield connected
    finally:
        for client in made:
            client.close()
