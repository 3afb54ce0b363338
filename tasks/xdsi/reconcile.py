"""``pacsflow xdsi check``: the XDS-I.b ledger reconciled with the registry (ITI-18 FindDocuments per
patient pseudonym of the ledger's published studies).

:func:`compare` is pure (ledger rows and registry entries in, differences out); :func:`check_registry`
reads the ledger and the catalog's pseudonyms and asks the registry. What counts as a difference:

* ``missing``: a published study whose entry (its entryUUID or KOS UID) the registry does not have;
* ``not-approved``: it has the entry, but not Approved (deprecated by someone else, for instance);
* ``not-deprecated``: the entry a study's last publication replaced (RPLC) is still Approved;
* ``unknown``: an Approved entry under one of our pseudonyms that the ledger does not know (an
  older Deprecated version of a ledger study is expected, not reported).

``--fix`` (:func:`fix_missing`) forgets the publication of each missing study in the ledger, so the
next publish run sends it again as a new entry. No PHI: study UIDs, entryUUIDs and KOS UIDs only.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from pacsflow.catalog.views import connect as connect_catalog
from pacsflow.tasks.core.errors import XdsConfigurationError
from pacsflow.tasks.settings import Settings
from pacsflow.tasks.xdsi.client import XdsRegistryClient
from pacsflow.tasks.xdsi.ebxml import cx_patient_id
from pacsflow.tasks.xdsi.ledger import LedgerRow, PublishStatus, XdsiLedger
from pacsflow.tasks.xdsi.query import APPROVED, DEPRECATED, RegistryEntry

_SQL_PSEUDONYMS = ("SELECT study_uid, patient_pseudo_id FROM studies WHERE study_uid IN "
                   "(SELECT unnest(?::VARCHAR[])) AND patient_pseudo_id IS NOT NULL")


class DifferenceKind(str, enum.Enum):
    MISSING = "missing"
    NOT_APPROVED = "not-approved"
    NOT_DEPRECATED = "not-deprecated"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Difference:
    study_uid: str  # "" when an unknown entry names no study
    kind: DifferenceKind
    detail: str  # one line: the entry and what the registry says


@dataclass
class CheckReport:
    """What ``pacsflow xdsi check`` found: patients asked, entries seen, studies checked, differences."""

    patients: int = 0
    entries: int = 0
    studies: int = 0
    uncataloged: int = 0  # published studies no longer in the catalog: their pseudonym is unknown, not asked
    differences: list[Difference] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(d.kind.value for d in self.differences).items()))

    def message(self) -> str:
        found = ", ".join(f"{n} {kind}" for kind, n in self.counts().items()) or "no difference"
        text = (f"{self.studies} published studies of {self.patients} patients checked against "
                f"{self.entries} registry entries: {found}")
        return text + (f"; {self.uncataloged} not in the catalog, not checked" if self.uncataloged else "")


class RegistryClient(Protocol):
    def find_documents(self, patient_cx: str) -> list[RegistryEntry]: ...


def _by_entry(entries: Iterable[RegistryEntry]) -> tuple[dict[str, RegistryEntry], dict[str, RegistryEntry]]:
    entries = list(entries)
    return {e.entry_uuid: e for e in entries}, {e.unique_id: e for e in entries if e.unique_id}


def _check_row(row: LedgerRow, by_uuid: Mapping[str, RegistryEntry],
               by_uid: Mapping[str, RegistryEntry]) -> list[Difference]:
    out = []
    entry = by_uuid.get(row.entry_uuid or "") or by_uid.get(row.kos_uid or "")
    if entry is None:
        out.append(Difference(row.study_uid, DifferenceKind.MISSING,
                              f"entry {row.entry_uuid} (KOS {row.kos_uid}) is not in the registry"))
    elif entry.status != APPROVED:
        out.append(Difference(row.study_uid, DifferenceKind.NOT_APPROVED,
                              f"entry {entry.entry_uuid} (KOS {entry.unique_id}) is {entry.status or 'without status'}"))
    replaced = by_uuid.get(row.replaced_entry_uuid or "")
    if replaced is not None and replaced.status == APPROVED:
        out.append(Difference(row.study_uid, DifferenceKind.NOT_DEPRECATED,
                              f"replaced entry {replaced.entry_uuid} is still Approved"))
    return out


def compare(rows: Mapping[str, LedgerRow], entries: Iterable[RegistryEntry]) -> list[Difference]:
    """The differences between the ledger's rows (by study UID) and the registry's entries under the
    same patients; the ledger's published rows are checked, every row's entries count as known."""
    by_uuid, by_uid = _by_entry(entries)
    out = [d for row in sorted(rows.values(), key=lambda r: r.study_uid)
           if row.status is PublishStatus.PUBLISHED for d in _check_row(row, by_uuid, by_uid)]
    known = {u for r in rows.values() for u in (r.entry_uuid, r.replaced_entry_uuid) if u}
    known_kos = {r.kos_uid for r in rows.values() if r.kos_uid}
    for entry in sorted(by_uuid.values(), key=lambda e: (e.study_uid or "", e.entry_uuid)):
        if entry.entry_uuid in known or entry.unique_id in known_kos:
            continue
        if entry.status == DEPRECATED and entry.study_uid in rows:
            continue  # an earlier version of one of our studies, replaced as it should be
        out.append(Difference(entry.study_uid or "", DifferenceKind.UNKNOWN,
                              f"entry {entry.entry_uuid} (KOS {entry.unique_id}, {entry.status}) is not in the ledger"))
    return out


def pseudonyms(settings: Settings, study_uids: Sequence[str]) -> dict[str, str]:
    """study UID -> patient pseudonym, from the catalog's studies table (studies it lacks are left out)."""
    if not study_uids:
        return {}
    with closing(connect_catalog(settings.catalog.reader(settings.catalog_root))) as con:
        return dict(con.execute(_SQL_PSEUDONYMS, [sorted(set(study_uids))]).fetchall())


def check_registry(settings: Settings, client: RegistryClient | None = None) -> CheckReport:
    """FindDocuments for each pseudonym of the ledger's published studies, compared with the ledger.
    Raises XdsConfigurationError when xdsi.registry_url (or pseudonym_oid) is unset, XdsUnavailable /
    XdsRegistryError as the client does."""
    xdsi = settings.xdsi
    if client is None and not xdsi.registry_url:
        raise XdsConfigurationError("xdsi.registry_url is not set: set PACSFLOW_XDSI__REGISTRY_URL (or "
                                    "xdsi.registry_url in the PACSFLOW_CONFIG file) to the registry's ITI-18 URL")
    if not xdsi.pseudonym_oid:
        raise XdsConfigurationError("xdsi.pseudonym_oid is not set: the registry's patient ID domain")
    rows = XdsiLedger.under(settings.state_root, settings.state.url).entries()
    published = [uid for uid, row in rows.items() if row.status is PublishStatus.PUBLISHED]
    patient_of = pseudonyms(settings, published)
    report = CheckReport(studies=len(patient_of), uncataloged=len(published) - len(patient_of))
    opened: Any = XdsRegistryClient.from_settings(xdsi) if client is None else nullcontext(client)
    with opened as registry:
        for pseudonym in sorted(set(patient_of.values())):
            entries = registry.find_documents(cx_patient_id(pseudonym, xdsi.pseudonym_oid))
            mine = {uid: rows[uid] for uid, p in patient_of.items() if p == pseudonym}
            report.patients += 1
            report.entries += len(entries)
            report.differences += compare(mine, entries)
    return report


def fix_missing(settings: Settings, report: CheckReport, run_id: str) -> list[str]:
    """Forgets the publication of each missing study, so the next publish run sends it again (as a
    new entry, not a replacement of one the registry lacks). Returns those study UIDs."""
    missing = sorted({d.study_uid for d in report.differences if d.kind is DifferenceKind.MISSING})
    XdsiLedger.under(settings.state_root, settings.state.url).forget(
        missing, "not in the registry (pacsflow xdsi check --fix)", run_id)
    return missing
