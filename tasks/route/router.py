"""What the listener does with a stable study: the rules decide per object, each destination's
copy is prepared and queued in the outbox, and the objects to ingest are linked into the lake's
hand-off folder.

Plain functions over files: no sockets, no Prefect. The listener calls :meth:`Router.route` for
each stable study and emits the ingest event itself. Every step is idempotent, so a study that is
routed again after a crash (it was not marked handled) queues nothing twice: a prepared copy
already on disk is reused, the outbox ignores an object it holds for that destination, and a
hand-off link that exists is kept.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from pydicom import dcmread

from pacsflow.tasks.core.errors import PacsflowError, error_text
from pacsflow.tasks.core.files import ensure_private_dir, write_atomic
from pacsflow.tasks.deid.deidentifier import DeidReport, Deidentifier
from pacsflow.tasks.deid.instance import deidentify_file, encode
from pacsflow.tasks.pacs.receiver import staged_name
from pacsflow.tasks.route.annotate import PrivateBlock, annotate, annotated_bytes
from pacsflow.tasks.route.outbox import Outbox
from pacsflow.tasks.route.rules import Forward, RoutingRules, Subject
from pacsflow.tasks.route.tracker import StableStudy

log = logging.getLogger(__name__)

QUEUE_BATCH = 500  # copies queued per outbox transaction (one commit per object waits for the disk each time)

# The bytes a destination that wants de-identified copies gets: (original, private blocks) -> Part 10.
DeidentifiedCopy = Callable[[Path, tuple[PrivateBlock, ...]], bytes]


def deidentified_copies(deid: Deidentifier) -> DeidentifiedCopy:
    """De-identified copies made as the lake makes them (the same key, profile and residual-PHI
    audit), with the destination's private blocks added after de-identification."""

    def copy(original: Path, blocks: tuple[PrivateBlock, ...]) -> bytes:
        ds, originals = deidentify_file(original, deid, DeidReport())
        annotate(ds, blocks)
        return encode(ds, originals)

    return copy


@dataclass(frozen=True)
class Arrival:
    """One received object of a stable study, as the listener hands it over."""

    sop_uid: str
    path: Path
    calling_ae: str

    @classmethod
    def of_study(cls, study: StableStudy) -> Iterator["Arrival"]:
        """The study's objects, read from the tracker a page at a time."""
        return (cls(sop, path, ae) for sop, path, ae in study.objects())


@dataclass
class Routed:
    """What routing one stable study did."""

    queued: Counter[str] = field(default_factory=Counter)  # destination -> objects queued now
    routed: int = 0  # objects read and decided on
    modalities: set[str] = field(default_factory=set)
    # A study goes to the lake whole when a rule says so for any of its objects (the same basis
    # as `pacsflow route dry-run`'s counts).
    ingest: bool = False
    unreadable: int = 0
    # (destination, sop_uid, one-line reason): copies that could not be made (e.g. the
    # de-identification refused the object); the rest of the study goes on.
    refused: list[tuple[str, str, str]] = field(default_factory=list)


class Router:
    """Applies ``rules`` to a stable study's objects; copies go under ``copies_dir/<destination>``."""

    def __init__(self, rules: RoutingRules, outbox: Outbox, copies_dir: Path,
                 deidentified: DeidentifiedCopy | None = None) -> None:
        self.rules = rules
        self.outbox = outbox
        self.copies_dir = ensure_private_dir(copies_dir)
        self.deidentified = deidentified

    def route(self, study_ref: str, arrivals: Iterable[Arrival]) -> Routed:
        """Decide on each object and queue its copies, ``QUEUE_BATCH`` objects per outbox
        transaction; nothing per object is kept, so a 20,000-image series routes in flat memory."""
        routed, batch = Routed(), list[tuple[str, str, str, Path]]()
        for arrival in arrivals:
            try:
                header = dcmread(arrival.path, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - the receiver checked it; a file changed since is skipped
                routed.unreadable += 1
                log.warning("study %s: a received object cannot be read any more; not routed", study_ref)
                continue
            decision = self.rules.decide(Subject.of_dataset(header, arrival.calling_ae))
            for forward in decision.forwards:
                try:
                    batch.append((forward.destination, arrival.sop_uid, study_ref, self._prepare(arrival, forward)))
                except (PacsflowError, OSError) as exc:
                    routed.refused.append((forward.destination, arrival.sop_uid, error_text(exc)))
                    log.warning("study %s: no copy for %s: %s", study_ref, forward.destination, error_text(exc))
            if len(batch) >= QUEUE_BATCH:
                routed.queued += self.outbox.enqueue_many(batch)
                batch.clear()
            routed.routed += 1
            routed.modalities.add(str(header.get("Modality", "") or "OT"))
            routed.ingest = routed.ingest or decision.ingest
        if batch:
            routed.queued += self.outbox.enqueue_many(batch)
        return routed

    def _prepare(self, arrival: Arrival, forward: Forward) -> Path:
        """The file the destination gets: the original itself (a hard link) when it is sent as
        received, else a copy with the destination's de-identification and private blocks."""
        target = self.copies_dir / forward.destination / staged_name(arrival.sop_uid)
        if target.exists():
            return target
        ensure_private_dir(target.parent)
        destination = self.rules.destinations[forward.destination]
        if destination.deidentify:
            if self.deidentified is None:
                raise ValueError(f"destination {forward.destination} wants de-identified copies, but the "
                                 "listener has no de-identification key (deid_key)")
            write_atomic(target, self.deidentified(arrival.path, forward.annotations), private=True)
        elif forward.annotations:
            write_atomic(target, annotated_bytes(arrival.path, forward.annotations), private=True)
        else:
            _link(arrival.path, target)
        return target


def link_for_ingest(originals: Iterable[Path], folder: Path) -> int:
    """Hard-link the originals to ingest into the lake's hand-off ``folder`` (PHI zone); links
    that exist already (a study routed again after a crash) are kept."""
    ensure_private_dir(folder)
    count = 0
    for original in originals:
        _link(original, folder / original.name)
        count += 1
    return count


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except FileExistsError:
        pass
