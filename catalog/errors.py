"""The catalog's own errors. The retry decision (``pacsflow.tasks.core.errors.is_transient``)
classifies them: CatalogBusy is worth retrying, every CatalogError is not."""

from __future__ import annotations


class CatalogError(Exception):
    """The catalog refused an operation; messages name tables, columns and counts, never values."""

    reason = "catalog"


class SchemaMismatch(CatalogError, ValueError):
    """An incoming table does not fit the declared schema."""

    reason = "catalog-schema"


class IntegrityError(CatalogError, ValueError):
    """Duplicate keys, or series/instance rows whose study is not in the commit."""

    reason = "catalog-integrity"


class CatalogBusy(Exception):
    """Another process held the catalog lock for longer than the lock timeout."""

    reason = "catalog-busy"
