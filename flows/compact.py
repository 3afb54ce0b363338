"""Catalog maintenance: one sorted file per partition, unreferenced files removed."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from pacsflow.flows.secrets import load_run_settings


@flow(name="compact-catalog", persist_result=False)
def compact_catalog(vacuum_grace_s: float = 3600.0) -> dict[str, Any]:
    """Rewrite every partition of every table into one file sorted by study, then delete the
    files no snapshot references any more (older than the grace period, so readers that
    opened the previous snapshot can finish). A catalog still in the older ``current ->
    snapshots/`` layout is migrated first (the store does it on any write) and loses its
    zero-row files here."""
    settings = load_run_settings()
    store = settings.catalog.open_store(settings.catalog_root)
    store.compact()
    store.vacuum(grace_s=vacuum_grace_s)
    stats = store.stats()
    get_run_logger().info("catalog compacted: %s", stats)
    return dict(stats)
