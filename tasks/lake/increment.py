"""A study that grew after it was cataloged: the rows of its new objects joined to the cataloged ones.

A catalog commit replaces every row of a study. When only the new objects of a study were
de-identified (a study pushed to the listener that resumed after its stability window), their
rows alone would drop the earlier instances from the catalog; :func:`with_cataloged_rows` rewrites
the study's row files to hold the earlier rows and the new ones, and the series and study
aggregates (instance counts, modalities, sizes, dates) computed again over all of them.
Plain functions (no Prefect); the catalog is read through one pinned snapshot.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pacsflow.catalog.schema import SCHEMAS
from pacsflow.catalog.store import TABLES
from pacsflow.catalog.views import Catalog, connect
from pacsflow.tasks.lake.rows import StudyExtractor
from pacsflow.tasks.lake.study import StudyOutcome, read_rows, write_rows

_SELECT = {t: f"SELECT {', '.join(SCHEMAS[t].names)} FROM {t} WHERE study_uid = ?" for t in TABLES}


def cataloged_rows(catalog_root: Catalog, study_uid: str) -> dict[str, pa.Table] | None:
    """The catalog's rows of one study (``studies``, ``series``, ``instances``), all from the
    current snapshot; None when the catalog does not have the study (or does not exist yet)."""
    if isinstance(catalog_root, (str, Path)) and not Path(catalog_root).is_dir():
        return None
    con = connect(catalog_root)
    try:
        rows = {t: con.sql(_SELECT[t], params=[study_uid]).to_arrow_table() for t in TABLES}
    finally:
        con.close()
    return rows if rows["studies"].num_rows else None


def with_cataloged_rows(outcome: StudyOutcome, catalog_root: Catalog) -> int:
    """Make the row files of ``outcome`` (written by the de-identification step) those of the
    whole study: the catalog's earlier rows of the study merged with the new ones (an instance in
    both is kept once). Returns how many instances the catalog had; 0 leaves the files as they were."""
    if not outcome.rows_dir or len(outcome.study_uids) != 1:
        return 0
    earlier = cataloged_rows(catalog_root, outcome.study_uids[0])
    if earlier is None:
        return 0
    merged = StudyExtractor.from_tables(earlier)
    merged.merge(StudyExtractor.from_tables(read_rows([outcome.rows_dir])))
    write_rows(outcome, merged, Path(outcome.rows_dir))
    return earlier["instances"].num_rows
