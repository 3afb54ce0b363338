"""What the PACS tells us, as plain values: studies found, sub-operation counts, completeness."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pacsflow.tasks.core.errors import IncompleteRetrieve
from pacsflow.tasks.settings import PacsSettings, RetrieveMethod, Settings


@dataclass(frozen=True)
class StudyInfo:
    """A study as the PACS reports it. ``study_uid`` and ``patient_id`` are originals: PHI zone
    only. ``patient_id`` (None when the PACS did not return it) serves only to compute the study
    date as de-identification shifts it, for run names."""

    study_uid: str
    study_date: str
    n_instances: int | None
    n_series: int | None
    modalities: tuple[str, ...]
    patient_id: str | None = field(default=None, repr=False)


class FindResult(list[Any]):
    """C-FIND answers; ``capped`` when the PACS said it stopped at its result limit."""

    capped: bool = False


@dataclass(frozen=True)
class SubOps:
    completed: int = 0
    failed: int = 0
    warning: int = 0


def check_complete(received: int, expected: int | None, study_ref: str) -> None:
    if expected is not None and received < expected:
        raise IncompleteRetrieve(f"study {study_ref}: received {received} of {expected} instances")


@dataclass(frozen=True)
class PacsPeer:
    """What a PACS client needs of the settings: the PACS, and the AE title we call it with."""

    pacs: PacsSettings
    calling_ae: str

    @classmethod
    def from_settings(cls, settings: Settings) -> "PacsPeer":
        return cls(settings.pacs, settings.calling_ae)


@dataclass(frozen=True)
class RetrieveRoute:
    """How a study comes to us: C-MOVE to our Storage SCP (``move_destination``, its AE title),
    or C-GET over the association that asks."""

    peer: PacsPeer
    method: RetrieveMethod
    move_destination: str
    receiver_address: str = ""  # host:port of our Storage SCP, for errors naming it

    @classmethod
    def from_settings(cls, settings: Settings) -> "RetrieveRoute":
        receiver = settings.receiver
        return cls(PacsPeer.from_settings(settings), settings.retrieve_method, receiver.ae_title,
                   f"{receiver.host}:{receiver.port}")

    @property
    def destination(self) -> str:
        """Our receiver as the PACS's modality list must know it: ``AE at host:port``."""
        return f"{self.move_destination} at {self.receiver_address}" if self.receiver_address else self.move_destination


# Some objects of one series: (SeriesInstanceUID, SOP Instance UIDs), originals (PHI zone).
Objects = tuple[str, tuple[str, ...]]


@dataclass(frozen=True)
class MissingObject:
    """An object the PACS listed but did not send. ``sop_uid`` is the original (PHI zone: memory
    and the ledger only); ``ref`` is its keyed pseudonym, what logs and artifacts show."""

    sop_uid: str
    ref: str
    reason: str

    def __repr__(self) -> str:  # keep the original UID out of reprs that end up in logs
        return f"MissingObject({self.ref}, {self.reason!r})"


@dataclass(frozen=True)
class Retrieved:
    """A retrieved study: what is staged, the objects the PACS did not send, and how many objects
    that it had not listed were refused (``rejected``)."""

    pseudo_uid: str
    staged_dir: str
    received: int
    missing: tuple[MissingObject, ...] = ()
    rejected: int = 0
