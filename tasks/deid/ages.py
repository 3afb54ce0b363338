"""Patient age under Retain Patient Characteristics: kept, capped at 90, computed when missing.

HIPAA Safe Harbor allows ages up to 89; every age of 90 or more must be reported as one
category, here ``"090Y"`` ("90 or more"). The cap applies to a stored PatientAge in any unit
(``"1100M"`` and ``"33000D"`` are over 90 too) and to an age computed from the birth date and the
study date when the object carries no PatientAge (the birth date itself is removed by the profile,
so the age is the only way its information reaches the output). A malformed age is dropped:
AS is four characters, and anything else could be free text.
"""

from __future__ import annotations

import datetime as dt

SAFE_HARBOR_CAP = "090Y"
_MAX_YEARS = 90
_DAYS_PER = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


def capped(value: str) -> str | None:
    """A stored AS value, with ages of 90 or more as ``"090Y"``; ``None`` when malformed."""
    text = value.strip(" \x00")
    if len(text) != 4 or not text[:3].isdigit() or text[3].upper() not in _DAYS_PER:
        return None
    unit = text[3].upper()
    years = int(text[:3]) * _DAYS_PER[unit] / 365.25
    return SAFE_HARBOR_CAP if years >= _MAX_YEARS else text[:3] + unit


def _date(text: str) -> dt.date | None:
    digits = text.strip(" \x00")[:8]
    try:
        return dt.datetime.strptime(digits, "%Y%m%d").date() if len(digits) == 8 and digits.isdigit() else None
    except ValueError:
        return None


def computed(birth_date: str, on: str) -> str | None:
    """The AS age on date ``on`` of someone born on ``birth_date`` (both DA text): days under a
    month, months under two years, then years; 90 or more as ``"090Y"``. ``None`` if unknown."""
    born, day = _date(birth_date), _date(on)
    if born is None or day is None or day < born:
        return None
    years = day.year - born.year - ((day.month, day.day) < (born.month, born.day))
    if years >= _MAX_YEARS:
        return SAFE_HARBOR_CAP
    if years >= 2:
        return f"{years:03d}Y"
    days = (day - born).days
    months = (day.year - born.year) * 12 + day.month - born.month - (day.day < born.day)
    return f"{days:03d}D" if months < 1 else f"{months:03d}M"
