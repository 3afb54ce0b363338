"""Which catalog store: the one-host snapshot store (the default) or Delta Lake tables.

Callers that write (the commit task, the compact flow) and the readers that must see the same
catalog (``pacsflow catalog query``, ``catalog views``) open the store with :func:`open_store` and
hand the store, not the root, to :mod:`pacsflow.catalog.views`. The catalog knows nothing of
settings: the caller passes the backend's name and options.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

from pacsflow.catalog.store import CatalogStore, CommitResult, VacuumResult

#: The backends by name (``catalog.backend`` in the settings).
BACKENDS: tuple[str, ...] = ("snapshot", "delta")


class CatalogSnapshot(Protocol):
    """What readers need of one consistent state of the catalog."""

    @property
    def version(self) -> int: ...
    @property
    def created_at(self) -> _dt.datetime | None: ...
    @property
    def schema_version(self) -> int: ...
    def paths(self, table: str, *, include_empty: bool = True) -> list[str]: ...
    def current_schema(self, table: str) -> bool: ...


@runtime_checkable
class CatalogBackend(Protocol):
    """The public surface of a catalog store (:class:`CatalogStore` has it, so has the Delta one)."""

    def commit(self, tables: Mapping[str, pa.Table]) -> CommitResult: ...
    def delete(self, study_uids: Iterable[str]) -> CommitResult: ...
    def compact(self) -> CommitResult: ...
    def vacuum(self, grace_s: float = 3600.0) -> VacuumResult: ...
    def snapshot(self) -> Any: ...  # a CatalogSnapshot
    def study_uids(self) -> set[str]: ...
    def stats(self) -> dict[str, Any]: ...
    def ensure_initialized(self) -> int: ...


def open_store(root: Path | str, backend: str = "snapshot", location: str = "",
               storage_options: Mapping[str, str] | None = None) -> CatalogBackend:
    """The catalog store for ``backend``. ``root`` is ``catalog_root``; the Delta tables live
    under ``location`` (a folder or an ``s3://`` URL), by default ``<root>/delta``.
    ``storage_options`` are delta-rs object-store options (endpoint, region, ...); credentials
    come from the environment (``AWS_ACCESS_KEY_ID``...), never from here."""
    if backend == "snapshot":
        return CatalogStore(root)
    if backend == "delta":
        from pacsflow.catalog.table_format import DeltaCatalogStore

        return DeltaCatalogStore(location or str(Path(root) / "delta"), storage_options=storage_options)
    raise ValueError(f"catalog backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
