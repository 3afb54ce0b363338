"""Element values as pydicom gives them: one value, or several (VM > 1).

pydicom returns a ``MultiValue`` for an element read with several values, while values set in
code may be lists or tuples; strings and bytes are single values even though they are sequences.
"""

from __future__ import annotations

from typing import Any, Sequence

from pydicom.multival import MultiValue

_MULTI = (MultiValue, list, tuple)


def is_multi(value: Any) -> bool:
    """True for a value holding several items (``MultiValue``, list or tuple)."""
    return isinstance(value, _MULTI)


def items_of(value: Any) -> Sequence[Any]:
    """The items of a multi-valued value, or the value alone as a one-item list."""
    return value if isinstance(value, _MULTI) else [value]


def int_or_none(value: Any) -> int | None:
    """An IS/US value (or its text) as an int; None when empty or not a whole number."""
    if value is None or value == "":
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None
