"""The catalog's own errors. The retry decision (``pacsflow.tasks.core.errors.is_transient``)
classifies them: CatalogBusy and CatalogWriteError are worth retrying, every other CatalogError is not."""

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


class CatalogWriteError(CatalogError):
    """The file system refused a commit's writes (full disk, lost mount, no permission); the current
    snapshot is unchanged and nothing of the failed build stays. One line: ``catalog_root``, the
    place under it and the OS reason."""

    reason = "catalog-write"


class CatalogNotFound(CatalogError):
    """A reader was pointed at a folder that does not exist (``catalog_root`` is wrong)."""

    reason = "catalog-not-found"


class CatalogBusy(Exception):
    """Another process held the catalog lock for longer than the lock timeout."""

    reason = "catalog-busy"
