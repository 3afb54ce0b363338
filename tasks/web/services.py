"""What the DICOMweb routes share: the catalog index and the lake's files (made once per
application, on first use), the base URL of links, and path UIDs checked before any lookup."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from pacsflow.tasks.web.app import context
from pacsflow.tasks.web.index import CatalogIndex
from pacsflow.tasks.web.lakefiles import LakeFiles
_lock = threading.Lock()
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class QueryError(ValueError):
    """A malformed or unsupported request (400); the message is one line and names no value."""


def check_uid(uid: str) -> str:
    """``uid`` when it is a well-formed UID (digits and dots, at most 64 characters), else QueryError."""
    if len(uid) > 64 or not _UID.match(uid):
        raise QueryError("malformed UID")
    return uid


@dataclass
class DicomWebServices:
    index: CatalogIndex
    files: LakeFiles
    public_base_url: str | None
    query_limit: int

    def base_url(self, request: Request) -> str:
        """Links in answers: ``serve.public_base_url`` when set, else the URL the request came to."""
        return (self.public_base_url or str(request.base_url)).rstrip("/")


def services(request: Request) -> DicomWebServices:
    state = request.app.state
    with _lock:
        if getattr(state, "dicomweb", None) is None:
            settings = context(request).settings
            index = CatalogIndex(settings.catalog.reader(settings.catalog_root))
            state.dicomweb = DicomWebServices(index, LakeFiles(settings.storage_root, settings.storage),
                                              settings.serve.public_base_url, settings.serve.query_limit)
    found: DicomWebServices = state.dicomweb
    return found


Services = Annotated[DicomWebServices, Depends(services)]


def uids(*values: str | None) -> None:
    """400 unless every given path UID is well formed (before any catalog or file access)."""
    try:
        for value in values:
            if value is not None:
                check_uid(value)
    except QueryError as exc:
        raise HTTPException(400, str(exc)) from None
