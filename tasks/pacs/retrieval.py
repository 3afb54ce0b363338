"""Retrieving every object of a study the PACS listed, or knowing exactly which ones it did not send.

A PACS that cannot send one object (an unknown SOP class, an unreadable file) may end the whole
C-MOVE or C-GET with a Failure status, and Orthanc stops at that object: the objects after it are
not sent either. So a failed study-level retrieve is followed by retrieves of what is still
missing, series by series, splitting a list in halves whenever a retrieve of it brings nothing,
until each object is on disk or has been asked for alone and refused. Cost: a few retrieves per
object the PACS cannot send, none when everything arrives at once.

Plain code: the retrieves are done by a ``send`` callable (the PACS client), and what is on disk
is read back through ``staged``; both are injected, so the logic is tested without sockets.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Mapping, NoReturn

from pacsflow.tasks.core.errors import IncompleteRetrieve
from pacsflow.tasks.pacs.models import Objects
from pacsflow.tasks.pacs.status import (
    PERMANENT_FAILURES,
    MoveDestinationUnknown,
    describe,
    is_success,
    move_destination_hint,
    raise_for_status,
)

# send(objects or None for the whole study) -> the final status of that retrieve
Send = Callable[[Objects | None], int]
# staged(SOP Instance UIDs) -> those of them on disk
Staged = Callable[[Iterable[str]], set[str]]
# other_way(objects) -> whether they arrive when asked for without a move destination (C-GET)
OtherWay = Callable[[Objects], bool]

# A study that brought nothing: how many objects are asked for alone before the failure is taken
# as the study's (a wrong move destination fails every object; probing them all would take hours).
PROBES_BEFORE_GIVING_UP = 3


def retrieve_listed(send: Send, listed: Mapping[str, str], staged: Staged, operation: str,
                    study_ref: str, *, other_way: OtherWay | None = None, destination: str = "") -> dict[str, int]:
    """Retrieve the objects ``listed`` (SOP Instance UID -> Series Instance UID) and return
    those the PACS would not send, each with the status of its last retrieve.

    Raises the study's typed error when the study-level retrieve failed for a reason that is
    not about single objects: a permanent status (e.g. unknown move destination), a Success that
    left objects missing, or a failure that no single object escapes. ``other_way`` (C-MOVE
    only) tells the latter apart from a move destination the PACS does not know
    (``destination``, ``AE at host:port``, named in that error)."""
    code = send(None)
    missing = sorted(set(listed) - staged(listed))
    if not missing:
        return {}
    if is_success(code):
        raise IncompleteRetrieve(f"{operation} for study {study_ref}: status success, but "
                                 f"{len(missing)} of {len(listed)} listed objects did not arrive")
    if code in PERMANENT_FAILURES:
        raise_for_status(code, operation, study_ref, destination)
    if len(missing) == len(listed) and not _any_arrives(send, listed, staged, missing):
        sample = (listed[missing[0]], (missing[0],))
        _raise_nothing_sent(code, operation, study_ref, other_way is not None and other_way(sample), destination)
    refused: dict[str, int] = {}
    for series_uid, sop_uids in _by_series(listed, set(listed) - staged(listed)).items():
        refused.update(_bisect(send, series_uid, sop_uids, staged))
    return refused


def describe_refusal(code: int) -> str:
    """Why an object is missing, in the PACS's words."""
    return f"the PACS did not send it (status {describe(code)})"


def _raise_nothing_sent(code: int, operation: str, study_ref: str, sent_otherwise: bool,
                        destination: str) -> NoReturn:
    """A retrieve no object escapes fails the study (transient, unless its status says otherwise),
    except when the same object comes by C-GET: then the PACS will not send to our receiver.
    Orthanc answers a move destination it does not know with 0xC000 and no sub-operation, exactly
    as it answers a study whose files it cannot read; only the second way of asking tells them apart."""
    if sent_otherwise:
        raise MoveDestinationUnknown(f"{operation} for study {study_ref}: status {describe(code)} and nothing sent, "
                                     f"but the PACS sends the study by C-GET; {move_destination_hint(destination)}")
    raise_for_status(code, operation, study_ref, destination)
    raise AssertionError("unreachable: a status that is not Success always raises")


def _any_arrives(send: Send, listed: Mapping[str, str], staged: Staged, missing: list[str]) -> bool:
    """Ask for a few objects alone: does any of them arrive?"""
    for sop_uid in missing[:PROBES_BEFORE_GIVING_UP]:
        send((listed[sop_uid], (sop_uid,)))
        if staged([sop_uid]):
            return True
    return False


def _by_series(listed: Mapping[str, str], sop_uids: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for sop_uid in sorted(sop_uids):
        out[listed[sop_uid]].append(sop_uid)
    return dict(out)


def _bisect(send: Send, series_uid: str, sop_uids: list[str], staged: Staged) -> dict[str, int]:
    """Retrieve ``sop_uids`` of one series: a list that makes progress is asked for again (minus
    what arrived); one that brings nothing is split in halves; an object asked for alone that does
    not arrive is refused."""
    refused: dict[str, int] = {}
    todo = [sop_uids]
    while todo:
        batch = todo.pop()
        code = send((series_uid, tuple(batch)))
        arrived = staged(batch)
        left = [uid for uid in batch if uid not in arrived]
        if not left:
            continue
        if len(left) < len(batch):
            todo.append(left)
        elif len(batch) == 1:
            refused[batch[0]] = code
        else:
            mid = len(batch) // 2
            todo += [batch[mid:], batch[:mid]]
    return refused
