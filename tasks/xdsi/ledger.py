"""The XDS-I.b publish ledger (``state_root/xdsi_publish.sqlite``, or the schema ``xdsi`` at
``state.url``): per catalog study, the manifest last published (content hash, KOS UID, the
DocumentEntry's entryUUID and the entry it replaced) and the outcome of the last attempt; and the
research-consent flags ``xdsi.consent_required`` asks for, per patient pseudonym.

A failure keeps what was published before: the registry still has that entry, and the next
publication of the study replaces it (RPLC). Transient failures are tried again next run; a
registry error (an ``error_code`` such as XDSUnknownPatientId) only once the study changes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pacsflow.tasks.core.clock import utc_timestamp
from pacsflow.tasks.core.statedb import StateDb, in_lists

LEDGER_NAME = "xdsi_publish.sqlite"
SCHEMA_NAME = "xdsi"  # the PostgreSQL schema of its tables
_REASON_CHARS = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS xdsi_studies (
    study_uid           TEXT PRIMARY KEY,  -- the catalog's (de-identified) StudyInstanceUID
    status              TEXT NOT NULL,     -- 'pending' | 'published' | 'failed': the last attempt
    content_hash        TEXT,              -- the manifest last published (None: never)
    kos_uid             TEXT,              -- its KOS SOP Instance UID (= DocumentEntry.uniqueId)
    entry_uuid          TEXT,              -- its DocumentEntry entryUUID (urn:uuid:...)
    replaced_entry_uuid TEXT,              -- the entry it replaced by RPLC
    attempted_hash      TEXT,              -- the manifest of the last attempt that did not publish
    error_code          TEXT,              -- the registry's errorCode (XDSUnknownPatientId), or the error class
    reason              TEXT,              -- one line, no PHI
    transient           INTEGER NOT NULL DEFAULT 0,
    attempts            INTEGER NOT NULL DEFAULT 0,  -- failed attempts since the last publication
    updated_at          TEXT NOT NULL,
    run_id              TEXT
);
CREATE INDEX IF NOT EXISTS xdsi_studies_status ON xdsi_studies(status);
CREATE TABLE IF NOT EXISTS xdsi_consent (
    patient_pseudo_id TEXT PRIMARY KEY,  -- the pseudonym (the affinity domain's patient ID)
    granted_at        TEXT NOT NULL
);
"""


class PublishStatus(str, enum.Enum):
    PENDING = "pending"  # to be published (e.g. waiting for consent)
    PUBLISHED = "published"
    FAILED = "failed"


@dataclass(frozen=True)
class LedgerRow:
    study_uid: str
    status: PublishStatus
    content_hash: str | None
    kos_uid: str | None
    entry_uuid: str | None
    replaced_entry_uuid: str | None
    attempted_hash: str | None
    error_code: str | None
    reason: str | None
    transient: bool
    attempts: int
    updated_at: str
    run_id: str | None


class Publication(NamedTuple):
    """A manifest the repository accepted."""

    study_uid: str
    content_hash: str
    kos_uid: str
    entry_uuid: str
    replaced_entry_uuid: str | None = None


class Failure(NamedTuple):
    """A manifest that was not published; ``error_code`` as the registry said it."""

    study_uid: str
    content_hash: str
    error_code: str | None
    reason: str
    transient: bool


_COLUMNS = ("study_uid, status, content_hash, kos_uid, entry_uuid, replaced_entry_uuid, attempted_hash, error_code, "
            "reason, transient, attempts, updated_at, run_id")


def _row(r: Sequence[Any]) -> LedgerRow:
    return LedgerRow(r[0], PublishStatus(r[1]), r[2], r[3], r[4], r[5], r[6], r[7], r[8], bool(r[9]), r[10], r[11],
                     r[12])


def _one_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:_REASON_CHARS]


def needs_publishing(row: LedgerRow | None, content_hash: str) -> bool:
    """New, changed since last published, pending, failed for a transient reason, or failed
    permanently and changed since."""
    if row is None:
        return True
    if content_hash == row.content_hash:  # the registry has this very manifest
        return False
    if row.status is PublishStatus.FAILED and not row.transient:
        return content_hash != row.attempted_hash
    return True


class XdsiLedger:
    """SQLite ``path`` (WAL), or the schema ``xdsi`` at ``url``; one transaction per update."""

    def __init__(self, path: Path, url: str | None = None) -> None:
        self.path = Path(path)
        self.db = StateDb(self.path, url, SCHEMA_NAME, _SCHEMA)

    @classmethod
    def under(cls, state_root: Path, url: str | None = None) -> XdsiLedger:
        """The ledger of the deployment whose state root is ``state_root`` (and state database ``url``)."""
        return cls(Path(state_root) / LEDGER_NAME, url)

    # -- reading -------------------------------------------------------------------------------------
    def entries(self, study_uids: Iterable[str] | None = None) -> dict[str, LedgerRow]:
        query = f"SELECT {_COLUMNS} FROM xdsi_studies"
        with self.db.tx() as tx:
            if study_uids is None:
                rows = tx.execute(query).fetchall()
            else:
                rows = [r for marks, part in in_lists(study_uids)
                        for r in tx.execute(f"{query} WHERE study_uid IN ({marks})", part).fetchall()]
        return {r[0]: _row(r) for r in rows}

    def to_publish(self, hashes: Mapping[str, str]) -> list[str]:
        """Of ``{study_uid: content_hash}``, the studies to publish now (:func:`needs_publishing`), sorted."""
        rows = self.entries(hashes)
        return sorted(uid for uid, h in hashes.items() if needs_publishing(rows.get(uid), h))

    def to_replace(self, study_uids: Iterable[str]) -> dict[str, str]:
        """The entryUUID each of these studies' next manifest replaces (RPLC): the last one published."""
        return {uid: row.entry_uuid for uid, row in self.entries(study_uids).items() if row.entry_uuid}

    def failed(self, *, transient: bool | None = None) -> list[str]:
        """The studies whose last attempt failed (only the transient or permanent ones when asked), sorted."""
        query = "SELECT study_uid FROM xdsi_studies WHERE status = ?"
        params: list[Any] = [PublishStatus.FAILED.value]
        if transient is not None:
            query += " AND transient = ?"
            params.append(int(transient))
        with self.db.tx() as tx:
            return sorted(r[0] for r in tx.execute(query, params).fetchall())

    # -- writing -------------------------------------------------------------------------------------
    def mark_published(self, items: Sequence[Publication], run_id: str) -> None:
        now = utc_timestamp()
        with self.db.tx() as tx:
            tx.executemany(
                """INSERT INTO xdsi_studies(study_uid, status, content_hash, kos_uid, entry_uuid, replaced_entry_uuid,
                                            attempted_hash, error_code, reason, transient, attempts, updated_at,
                                            run_id)
                   VALUES (?, 'published', ?, ?, ?, ?, NULL, NULL, NULL, 0, 0, ?, ?)
                   ON CONFLICT(study_uid) DO UPDATE SET
                     status='published', content_hash=excluded.content_hash, kos_uid=excluded.kos_uid,
                     entry_uuid=excluded.entry_uuid, replaced_entry_uuid=excluded.replaced_entry_uuid,
                     attempted_hash=NULL, error_code=NULL, reason=NULL, transient=0, attempts=0,
                     updated_at=excluded.updated_at, run_id=excluded.run_id""",
                [(p.study_uid, p.content_hash, p.kos_uid, p.entry_uuid, p.replaced_entry_uuid, now, run_id)
                 for p in items],
            )

    def mark_failed(self, items: Sequence[Failure], run_id: str) -> None:
        """Records the failed attempts; what was published before stays (the registry still has it)."""
        self._attempted(PublishStatus.FAILED,
                        [(f.study_uid, f.content_hash, f.error_code, _one_line(f.reason), int(f.transient), 1)
                         for f in items], run_id)

    def mark_pending(self, items: Sequence[tuple[str, str, str]], run_id: str) -> None:
        """items: (study_uid, content hash, reason): to be published, not attempted (e.g. no consent yet)."""
        self._attempted(PublishStatus.PENDING,
                        [(uid, h, None, _one_line(reason), 0, 0) for uid, h, reason in items], run_id)

    def forget(self, study_uids: Sequence[str], reason: str, run_id: str) -> None:
        """The registry lost these studies' entries (``pacsflow xdsi check --fix``): pending, with no
        publication, so the next run sends each again as a new entry (not a replacement)."""
        now = utc_timestamp()
        with self.db.tx() as tx:
            tx.executemany(
                """UPDATE xdsi_studies SET status='pending', content_hash=NULL, kos_uid=NULL, entry_uuid=NULL,
                     replaced_entry_uuid=NULL, attempted_hash=NULL, error_code=NULL, reason=?, transient=0,
                     updated_at=?, run_id=? WHERE study_uid=?""",
                [(_one_line(reason), now, run_id, uid) for uid in study_uids])

    def _attempted(self, status: PublishStatus, rows: list[tuple[str, str, str | None, str, int, int]],
                   run_id: str) -> None:
        now = utc_timestamp()
        with self.db.tx() as tx:
            tx.executemany(
                """INSERT INTO xdsi_studies(study_uid, status, attempted_hash, error_code, reason, transient, attempts,
                                            updated_at, run_id)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(study_uid) DO UPDATE SET
                     status=excluded.status, attempted_hash=excluded.attempted_hash,
                     error_code=excluded.error_code, reason=excluded.reason, transient=excluded.transient,
                     attempts=xdsi_studies.attempts + excluded.attempts, updated_at=excluded.updated_at,
                     run_id=excluded.run_id""",
                [(uid, status.value, h, code, reason, transient, n, now, run_id)
                 for uid, h, code, reason, transient, n in rows],
            )

    # -- consent -------------------------------------------------------------------------------------
    def grant(self, pseudonyms: Iterable[str]) -> None:
        """Research consent for these patient pseudonyms (a grant already recorded keeps its time)."""
        now = utc_timestamp()
        with self.db.tx() as tx:
            tx.executemany("INSERT INTO xdsi_consent(patient_pseudo_id, granted_at) VALUES (?, ?) "
                           "ON CONFLICT(patient_pseudo_id) DO NOTHING", [(p, now) for p in set(pseudonyms)])

    def revoke(self, pseudonyms: Iterable[str]) -> None:
        """Withdraws consent; manifests already published stay in the registry until deprecated."""
        with self.db.tx() as tx:
            for marks, part in in_lists(set(pseudonyms)):
                tx.execute(f"DELETE FROM xdsi_consent WHERE patient_pseudo_id IN ({marks})", part)

    def has_consent(self, pseudonyms: Iterable[str]) -> set[str]:
        """Those of ``pseudonyms`` that have a research-consent flag."""
        with self.db.tx() as tx:
            return {r[0] for marks, part in in_lists(set(pseudonyms))
                    for r in tx.execute(f"SELECT patient_pseudo_id FROM xdsi_consent WHERE patient_pseudo_id IN "
                                        f"({marks})", part).fetchall()}

    def consents(self) -> dict[str, str]:
        """Every pseudonym with a research-consent flag, and when it was granted (UTC, ISO 8601)."""
        with self.db.tx() as tx:
            return {r[0]: r[1] for r in tx.execute("SELECT patient_pseudo_id, granted_at FROM xdsi_consent "
                                                   "ORDER BY patient_pseudo_id").fetchall()}
