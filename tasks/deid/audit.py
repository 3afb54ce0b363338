"""Residual-PHI audit: look for the original's identifying values in the encoded output.

The original values are collected once, while the object is de-identified (``Originals`` in
``pacsflow.tasks.deid``: patient names and IDs, birth date, accession number, addresses, institution,
device serial, every person name at any depth, and replaced UIDs). The audit searches the
encoded Part 10 bytes, i.e. every header, sequence, private block and the file meta, for each
value in every encoding it may take (the original bytes, UTF-8, Latin-1 and the object's
character set, ISO 2022 escapes included), case-insensitively, both whole and by name
component. Pixel data is searched only for long values (8 bytes or more) to avoid chance
matches in image bytes. A hit raises ``ResidualPHIError`` naming the attribute keyword only.
"""

from __future__ import annotations

import re

from pacsflow.tasks.deid.deidentifier import Originals, encoded_forms
from pacsflow.tasks.core.errors import DeidentificationError

_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")
_PIXEL_MIN = 8


class ResidualPHIError(DeidentificationError):
    """An original identifying value survived de-identification: the object must not leave."""

    reason = "residual-phi"


# Values worth looking for inside pixel bytes too (long names and IDs, not UIDs or dates).
_PIXEL_KEYWORDS = frozenset({"PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames",
                             "PatientBirthName", "AccessionNumber", "PersonName"})


def audit_bytes(data: bytes, originals: Originals | None) -> list[str]:
    """The keywords whose original values occur in ``data`` (empty when clean)."""
    if originals is None or not originals.values:
        return []
    cut = max(data.rfind(t) for t in _PIXEL_TAGS)
    header = (data[:cut] if cut > 0 else data).lower()
    pixels = data[cut:] if cut > 0 else b""
    owner: dict[bytes, str] = {}
    pixel_forms: dict[bytes, str] = {}
    for keyword, tokens in sorted(originals.tokens().items()):
        for token in tokens:
            for form in encoded_forms(token, originals.encodings):
                owner.setdefault(form.lower(), keyword)
                if keyword in _PIXEL_KEYWORDS and len(form) >= _PIXEL_MIN:
                    pixel_forms.setdefault(form, keyword)
    if not owner:
        return []
    alt = b"|".join(re.escape(f) for f in sorted(owner, key=len, reverse=True))
    # whole words only: a name "Here" must not match "Manufacturer name here"
    pattern = re.compile(rb"(?<![a-z0-9_])(?:" + alt + rb")(?![a-z0-9_])")
    hits = {owner[m.group(0)] for m in pattern.finditer(header)}
    hits.update(kw for form, kw in pixel_forms.items() if kw not in hits and form in pixels)
    return sorted(hits)


def audit_or_raise(data: bytes, originals: Originals | None) -> None:
    hits = audit_bytes(data, originals)
    if hits:
        raise ResidualPHIError("residual identifier after de-identification: " + ", ".join(hits))
