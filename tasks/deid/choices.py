"""The closed sets a de-identification run is configured with, by the names settings use.

Kept apart from the de-identifier so that ``pacsflow.tasks.settings`` can type its fields with
them without importing pydicom (and without an import cycle: the de-identifier is built from
settings). Every member's value is the string written in YAML, environment variables and the
CLI, so configurations name them as before.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class Option(str, enum.Enum):
    """The option columns of PS3.15 Table E.1-1, by the name the table uses."""

    CLEAN_DESCRIPTORS = "Clean Descriptors"
    CLEAN_GRAPHICS = "Clean Graphics"
    CLEAN_STRUCTURED_CONTENT = "Clean Structured Content"
    RETAIN_DEVICE_IDENTITY = "Retain Device Identity"
    RETAIN_INSTITUTION_IDENTITY = "Retain Institution Identity"
    RETAIN_FULL_DATES = "Retain Long. Full Dates"
    RETAIN_MODIFIED_DATES = "Retain Long. Modified Dates"
    RETAIN_PATIENT_CHARACTERISTICS = "Retain Patient Characteristics"
    RETAIN_SAFE_PRIVATE = "Retain Safe Private"
    RETAIN_UIDS = "Retain UIDs"


#: The options a run uses unless settings say otherwise, chosen for research use (README,
#: "De-identification"): shifted dates, sex/age/size/weight, and descriptions cleaned of names,
#: IDs and dates, so that series can be told apart and cohorts stratified.
DEFAULT_OPTIONS: tuple[Option, ...] = (
    Option.RETAIN_MODIFIED_DATES,
    Option.RETAIN_PATIENT_CHARACTERISTICS,
    Option.CLEAN_DESCRIPTORS,
)


class PixelPolicy(str, enum.Enum):
    """What happens to an object whose pixels may show burned-in text (see :mod:`.pixels`)."""

    OCR = "ocr"
    QUARANTINE = "quarantine"
    MASK = "mask"
    ALLOW = "allow"


class SafePrivateList(str, enum.Enum):
    """The list of private attributes Retain Safe Private may keep."""

    PS3_15_TABLE_E_3_10_1 = "ps3.15-table-e.3.10-1"


def conflicting_dates(options: Iterable[Option]) -> bool:
    """Full dates and modified dates exclude each other."""
    chosen = set(options)
    return Option.RETAIN_FULL_DATES in chosen and Option.RETAIN_MODIFIED_DATES in chosen
