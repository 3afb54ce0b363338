"""Time stamps and run ids, in one format everywhere (UTC)."""

from __future__ import annotations

import datetime as dt
import uuid


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def utc_timestamp() -> str:
    """ISO 8601 to the second, as the ledgers store it."""
    return utc_now().isoformat(timespec="seconds")


def new_run_id() -> str:
    """``20261130T013000Z-a1b2c3``: sorts by start time, unique across processes."""
    return utc_now().strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def parse_dicom_date(value: str | None) -> dt.date | None:
    """A DICOM DA (``YYYYMMDD``, longer values cut) as a date; None when it is not one."""
    try:
        return dt.datetime.strptime((value or "")[:8], "%Y%m%d").date()
    except ValueError:
        return None
