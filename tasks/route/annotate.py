"""Private blocks that a routing rule adds to the copies sent to one destination.

A block is a private creator in an odd group plus elements at offsets within the creator's slot
(PS3.5 7.8.1): pydicom's private_block API picks the slot, reusing the one of the same creator
and taking a free one otherwise, so another creator's elements are never written over.

Values are ASCII and checked against their VR when the rules load, so a bad annotation stops
the rules file, not a delivery at three in the morning.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
NUMBER_TEXT_VRS = frozenset({"DS", "IS"})
BINARY_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD"})
VRS = TEXT_VRS | NUMBER_TEXT_VRS | BINARY_NUMBER_VRS


def _hex_int(value: Any) -> Any:
    """Tags are written in hex: "0x0013", "0013" and YAML's own 0x0013 (an int) all mean 19."""
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("0x")
        try:
            return int(text, 16)
        except ValueError:
            raise ValueError("must be a hexadecimal number such as 0x0013") from None
    return value


HexInt = Annotated[int, BeforeValidator(_hex_int)]


class PrivateElement(BaseModel):
    """One element of a block: ``element`` is its offset in the creator's slot (0x10..0xFF)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    element: HexInt = Field(ge=0x10, le=0xFF)
    vr: str
    value: str | int | float

    @field_validator("vr")
    @classmethod
    def _known_vr(cls, v: str) -> str:
        vr = v.strip().upper()
        if vr not in VRS:
            raise ValueError(f"VR must be one of {', '.join(sorted(VRS))}")
        return vr

    @field_validator("value", mode="before")
    @classmethod
    def _no_boolean(cls, v: Any) -> Any:
        if isinstance(v, bool):  # pydantic would take it for 1 or 0
            raise ValueError("a boolean is no DICOM value (quote it)")
        return v

    @model_validator(mode="after")
    def _value_fits_vr(self) -> PrivateElement:
        value = self.value
        if self.vr in BINARY_NUMBER_VRS:
            if isinstance(value, str):
                raise ValueError(f"value: VR {self.vr} holds a number, not text")
        elif not isinstance(value, str):
            value = str(value)  # YAML reads 5 as an int; for LO or IS it means the text "5"
        if isinstance(value, str) and not (value.isascii() and value.isprintable()) or "\\" in str(value):
            raise ValueError("value: one value of printable ASCII without backslash (no character set to declare)")
        try:
            validate_value(self.vr, value, pydicom_config.RAISE)
        except (ValueError, TypeError):
            raise ValueError(f"value: not a valid {self.vr} value") from None
        object.__setattr__(self, "value", value)
        return self


class PrivateBlock(BaseModel):
    """A private creator and its elements, e.g. creator ``AI_PRIORITY`` in group 0x0013."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    group: HexInt
    creator: str = Field(min_length=1, max_length=64)
    elements: tuple[PrivateElement, ...] = Field(min_length=1)

    @field_validator("group")
    @classmethod
    def _private_group(cls, v: int) -> int:
        # odd groups are private; 0001-0007 and FFFF are not allowed (PS3.5 7.8.1)
        if v % 2 == 0 or not 0x0009 <= v <= 0xFFFD:
            raise ValueError("must be an odd group from 0x0009 to 0xFFFD")
        return v

    @field_validator("creator")
    @classmethod
    def _creator_is_lo(cls, v: str) -> str:
        if not (v.isascii() and v.isprintable()) or "\\" in v or not v.strip():
            raise ValueError("must be printable ASCII without backslash")
        return v.strip()

    @field_validator("elements")
    @classmethod
    def _distinct_offsets(cls, v: tuple[PrivateElement, ...]) -> tuple[PrivateElement, ...]:
        offsets = [e.element for e in v]
        if len(set(offsets)) != len(offsets):
            raise ValueError("two elements at the same offset")
        return v

    def describe(self) -> str:
        """One line for operators, e.g. ``(0013,AI_PRIORITY) 10 LO HIGH``: rule text, no header values."""
        parts = ", ".join(f"{e.element:02X} {e.vr} {e.value}" for e in self.elements)
        return f"({self.group:04X},{self.creator}) {parts}"


def annotate(ds: Dataset, blocks: Iterable[PrivateBlock]) -> None:
    """Add ``blocks`` to ``ds`` in place; a block of the same creator in the same group is reused."""
    for block in blocks:
        private = ds.private_block(block.group, block.creator, create=True)
        for element in block.elements:
            private.add_new(element.element, element.vr, element.value)


def annotated_bytes(path: Path, blocks: Iterable[PrivateBlock]) -> bytes:
    """The Part 10 file at ``path`` with ``blocks`` added, in its own transfer syntax.

    Elements pydicom did not need to decode are written back as they were read, pixel data
    (encapsulated or not) included."""
    ds = dcmread(path)
    annotate(ds, blocks)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()
