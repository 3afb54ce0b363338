"""The FHIR sync ledger (``state_root/fhir_sync.sqlite``, or the schema ``fhir`` at ``state.url``): per
catalog study, the content hash last sent, status and reason. Unchanged studies are skipped; failed
ones are sent again next run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from pacsflow.tasks.core.clock import utc_timestamp
from pacsflow.tasks.core.statedb import StateDb


LEDGER_NAME = "fhir_sync.sqlite"
SCHEMA_NAME = "fhir"  # the PostgreSQL schema of its table
_CHUNK = 500  # UIDs per IN (...) list


# -- ledger ------------------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS fhir_studies (
    study_uid    TEXT PRIMARY KEY,  -- the catalog's (de-identified) StudyInstanceUID
    synced_hash  TEXT,              -- content hash of the resources last committed by the server
    status       TEXT NOT NULL,     -- 'synced' | 'failed'
    reason       TEXT,              -- failure class and redacted diagnostics
    transient    INTEGER NOT NULL DEFAULT 0,
    attempts     INTEGER NOT NULL DEFAULT 0,  -- failed attempts since the last success
    server_id    TEXT,              -- ImagingStudy id on the server
    updated_at   TEXT NOT NULL,
    run_id       TEXT
);
CREATE INDEX IF NOT EXISTS fhir_studies_status ON fhir_studies(status);
"""


@dataclass(frozen=True)
class LedgerRow:
    study_uid: str
    synced_hash: str | None
    status: str
    reason: str | None
    transient: bool
    attempts: int
    server_id: str | None
    run_id: str | None


class FhirSyncLedger:
    """SQLite ``path`` (WAL, so concurrent runs can share it), or the schema ``fhir`` at ``url``;
    one transaction per update."""

    def __init__(self, path: Path, url: str | None = None) -> None:
        self.path = Path(path)
        self.db = StateDb(self.path, url, SCHEMA_NAME, _SCHEMA)

    @classmethod
    def under(cls, state_root: Path, url: str | None = None) -> FhirSyncLedger:
        """The ledger of the deployment whose state root is ``state_root`` (and state database ``url``)."""
        return cls(Path(state_root) / LEDGER_NAME, url)

    def _tx(self):
        return self.db.tx()

    def entries(self, study_uids: Iterable[str] | None = None) -> dict[str, LedgerRow]:
        query = ("SELECT study_uid, synced_hash, status, reason, transient, attempts, server_id, run_id "
                 "FROM fhir_studies")
        with self._tx() as con:
            if study_uids is None:
                rows = con.execute(query).fetchall()
            else:
                uids = list(study_uids)
                rows = []
                for i in range(0, len(uids), _CHUNK):
                    part = uids[i : i + _CHUNK]
                    rows += con.execute(query + f" WHERE study_uid IN ({', '.join('?' * len(part))})",
                                        part).fetchall()
        return {r[0]: LedgerRow(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6], r[7]) for r in rows}

    def failed(self) -> list[str]:
        with self._tx() as con:
            rows = con.execute("SELECT study_uid FROM fhir_studies WHERE status = 'failed' ORDER BY study_uid")
            return [r[0] for r in rows.fetchall()]

    def mark_synced(self, items: Sequence[tuple[str, str, str | None]], run_id: str) -> None:
        """items: (study_uid, content hash, server id)."""
        now = utc_timestamp()
        with self._tx() as con:
            con.executemany(
                """INSERT INTO fhir_studies(study_uid, synced_hash, status, reason, transient, attempts, server_id,
                                            updated_at, run_id)
                   VALUES (?, ?, 'synced', NULL, 0, 0, ?, ?, ?)
                   ON CONFLICT(study_uid) DO UPDATE SET
                     synced_hash=excluded.synced_hash, status='synced', reason=NULL, transient=0, attempts=0,
                     server_id=COALESCE(excluded.server_id, fhir_studies.server_id),
                     updated_at=excluded.updated_at, run_id=excluded.run_id""",
                [(uid, h, sid, now, run_id) for uid, h, sid in items],
            )

    def mark_failed(self, items: Sequence[tuple[str, str, bool]], run_id: str) -> None:
        """items: (study_uid, reason, transient). Keeps the hash last synced (the server still has it)."""
        now = utc_timestamp()
        with self._tx() as con:
            con.executemany(
                """INSERT INTO fhir_studies(study_uid, synced_hash, status, reason, transient, attempts, server_id,
                                            updated_at, run_id)
                   VALUES (?, NULL, 'failed', ?, ?, 1, NULL, ?, ?)
                   ON CONFLICT(study_uid) DO UPDATE SET
                     status='failed', reason=excluded.reason, transient=excluded.transient,
                     attempts=fhir_studies.attempts + 1, updated_at=excluded.updated_at, run_id=excluded.run_id""",
                [(uid, reason, int(transient), now, run_id) for uid, reason, transient in items],
            )

