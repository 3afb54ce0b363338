"""What the PACS tells us, as plain values: studies found, sub-operation counts, completeness."""

from __future__ import annotations

from dataclasses import dataclass

from pacsflow.tasks.core.errors import IncompleteRetrieve


@dataclass(frozen=True)
class StudyInfo:
    """A study as the PACS reports it. ``study_uid`` is the original UID: PHI zone only."""

    study_uid: str
    study_date: str
    n_instances: int | None
    n_series: int | None
    modalities: tuple[str, ...]


class FindResult(list):
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
class Retrieved:
    pseudo_uid: str
    staged_dir: str
    received: int
