"""The ``Accept`` header of DICOMweb requests (PS3.18 8.7): media ranges with their parameters
(``type``, ``transfer-syntax``) and q values, best first.

OHIF sends several ranges in one header, e.g. ``multipart/related; type=application/octet-stream;
transfer-syntax=*, multipart/related; type=image/jpeg, ...;q=0.9``: the routes take the first range,
in q order, they can answer rather than refusing the whole header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_PARAM = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)\s*')


@dataclass(frozen=True)
class MediaRange:
    """One range of an Accept header: ``type/subtype`` (lower case), parameters, q."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    def matches(self, media_type: str) -> bool:
        """Whether this range admits ``media_type`` (``*/*`` and ``type/*`` included)."""
        major, _, minor = self.media_type.partition("/")
        want_major, _, want_minor = media_type.partition("/")
        return major == "*" or (major == want_major and minor in ("*", want_minor))

    @property
    def part_type(self) -> str | None:
        """The ``type`` parameter of a multipart range (the media type of its parts)."""
        value = self.params.get("type")
        return value.lower() if value else None

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")


def _split(text: str, separator: str) -> list[str]:
    """Split at ``separator`` outside quoted strings; blank pieces dropped."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == separator and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return [piece.strip() for piece in out if piece.strip()]


def _parse_range(text: str) -> MediaRange | None:
    head, _, rest = text.partition(";")
    media_type = head.strip().lower()
    if "/" not in media_type:
        return None
    params: dict[str, str] = {}
    for chunk in _split(rest, ";"):
        found = _PARAM.fullmatch(chunk)
        if found:
            params[found.group(1).lower()] = found.group(2).strip('"')
    try:
        q = float(params.pop("q", "1"))
    except ValueError:
        q = 0.0
    return MediaRange(media_type, params, q)


def parse_accept(header: str | None) -> list[MediaRange]:
    """The header's ranges with q > 0, best first (ties keep the header's order); ``*/*`` when absent."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges = [r for r in (_parse_range(t) for t in _split(header, ",")) if r is not None and r.q > 0]
    return sorted(ranges, key=lambda r: -r.q)


def accepts_json(header: str | None) -> bool:
    """Whether a QIDO-RS or metadata answer (``application/dicom+json``) is acceptable."""
    return any(r.matches("application/dicom+json") or r.matches("application/json") for r in parse_accept(header))
