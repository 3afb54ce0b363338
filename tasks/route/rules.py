"""Routing rules: which destinations get an object, with which private blocks, and whether its
study goes to the lake. Pure: a rules file in, a :class:`Decision` per object out.

A rules file (YAML)::

    destinations:
      main-pacs: {ae_title: MAINPACS, host: pacs.local, port: 104}
    rules:
      - name: everything
        forward: [main-pacs]
      - name: mammography
        match: {Modality: MG}
        forward:
          - to: ai-archive
            annotate: [{group: 0x0013, creator: AI_PRIORITY, elements: [{element: 0x10, vr: LO, value: HIGH}]}]
        ingest: true

``match`` is a mapping of conditions that must all hold; ``all: [...]`` and ``any: [...]`` inside
it combine nested mappings. A condition's key is a DICOM keyword or ``calling_ae``; its value is
a string (equal), a list (equal to one of them), ``{regex: ...}`` (the whole value matches) or
``{not: <one of these>}``. A multi-valued attribute matches when one of its values does; an
absent or empty one matches nothing but a ``not``. A rule without ``match`` takes every object.

Every matching rule acts: the decision is the union of their forwards and ingest flags.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from pacsflow.tasks.route.annotate import PrivateBlock

CALLING_AE = "calling_ae"
COMBINATORS = ("all", "any")


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the file and the field, never its values."""


# -- the objects rules look at ------------------------------------------------------------------


class Subject:
    """What a rule sees of one object: the text values of its attributes and who sent it."""

    def __init__(self, lookup: Callable[[str], list[str]], calling_ae: str = "") -> None:
        self._lookup = lookup
        self.calling_ae = calling_ae

    def value(self, keyword: str) -> list[str]:
        """The attribute's values as text ([] when absent or empty); ``calling_ae`` is the sender's AE."""
        if keyword == CALLING_AE:
            return [self.calling_ae] if self.calling_ae else []
        return self._lookup(keyword)

    @classmethod
    def of_dataset(cls, ds: Dataset, calling_ae: str = "") -> Subject:
        """A pydicom header (pixel data need not be read)."""
        return cls(lambda keyword: _dataset_values(ds, keyword), calling_ae)

    @classmethod
    def of_mapping(cls, values: Mapping[str, Any], calling_ae: str = "") -> Subject:
        """Keyword -> value (text, number, list or None), e.g. one row of the catalog."""
        return cls(lambda keyword: _texts(values.get(keyword)), calling_ae)


def _dataset_values(ds: Dataset, keyword: str) -> list[str]:
    if keyword not in ds:
        return []
    element = ds[keyword]
    if element.VR == "SQ" or element.VR.startswith("O") or element.VR == "UN":
        return []  # sequences and binary values have no text to compare
    return _texts(element.value)


def _texts(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (MultiValue, list, tuple)):
        return [str(v) for v in value if v is not None and str(v) != ""]
    return [str(value)]


# -- conditions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """One key and its test; ``negate`` for ``{not: ...}``."""

    key: str
    equals: frozenset[str] = frozenset()
    regex: re.Pattern[str] | None = None
    negate: bool = False

    def holds(self, subject: Subject) -> bool:
        values = subject.value(self.key)
        if self.regex is not None:
            pattern = self.regex
            hit = any(pattern.fullmatch(v) for v in values)
        else:
            hit = any(v in self.equals for v in values)
        return hit != self.negate

    def keys(self) -> frozenset[str]:
        return frozenset({self.key})


@dataclass(frozen=True)
class Match:
    """Conditions and nested matches, combined by all (every part holds) or any (one does)."""

    parts: tuple[Union[Condition, Match], ...] = ()
    any_of: bool = False

    def holds(self, subject: Subject) -> bool:
        results = (part.holds(subject) for part in self.parts)
        return any(results) if self.any_of else all(results)

    def keys(self) -> frozenset[str]:
        return frozenset().union(*(part.keys() for part in self.parts))


def parse_match(raw: Any, where: str = "") -> Match:
    """A ``match`` mapping as written in the rules file; a ValueError's message starts with the
    path below ``match`` (``.any[1].Modality: ...``)."""
    if raw is None:
        return Match()
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: must be a mapping of conditions" if where else "must be a mapping of conditions")
    parts: list[Condition | Match] = []
    for key, value in raw.items():
        path = f"{where}.{key}"
        if key in COMBINATORS:
            items = value if isinstance(value, list) else [value]
            if not items:
                raise ValueError(f"{path}: must list at least one mapping")
            nested = tuple(parse_match(item, f"{path}[{i}]") for i, item in enumerate(items))
            parts.append(Match(nested, any_of=key == "any"))
        else:
            parts.append(_parse_condition(str(key), value, path))
    return Match(tuple(parts))


def _parse_condition(key: str, value: Any, path: str, negate: bool = False) -> Condition:
    if key != CALLING_AE and tag_for_keyword(key) is None:
        raise ValueError(f"{path}: not a DICOM keyword (nor calling_ae)")
    if isinstance(value, Mapping):
        if set(value) == {"not"} and not negate:
            return _parse_condition(key, value["not"], f"{path}.not", negate=True)
        if set(value) == {"regex"} and isinstance(value["regex"], str):
            try:
                return Condition(key, regex=re.compile(value["regex"]), negate=negate)
            except re.error:
                raise ValueError(f"{path}.regex: not a valid regular expression") from None
        raise ValueError(f"{path}: a mapping here is {{regex: TEXT}}" + ("" if negate else " or {not: ...}"))
    items = value if isinstance(value, list) else [value]
    if not items or any(isinstance(v, (bool, float, Mapping, list)) or v is None for v in items):
        raise ValueError(f"{path}: must be a text, a list of texts, {{regex: ...}} or {{not: ...}} "
                         "(quote values YAML reads as booleans or numbers)")
    return Condition(key, equals=frozenset(str(v) for v in items), negate=negate)


# -- the rules file --------------------------------------------------------------------------------


def _check_ae_title(value: str) -> str:
    value = value.strip()
    if not value or len(value) > 16 or "\\" in value or not value.isascii():
        raise ValueError("must be 1-16 ASCII characters without backslash")
    return value


class Destination(BaseModel):
    """A C-STORE peer; ``deidentify``: it gets the de-identified copy, else the original."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    ae_title: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    deidentify: bool = False
    max_associations: int = Field(2, ge=1, le=16)
    storage_commitment: bool = False

    _ae = field_validator("ae_title")(_check_ae_title)


class ForwardAction(BaseModel):
    """``{to: NAME, annotate: [BLOCK, ...]}`` in a rule's ``forward`` list."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    to: str = Field(min_length=1)
    annotate: tuple[PrivateBlock, ...] = ()


class Rule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    name: str = Field(min_length=1)
    match: Match = Match()
    forward: tuple[ForwardAction, ...] = ()
    ingest: bool = False

    @field_validator("match", mode="before")
    @classmethod
    def _parse_match(cls, v: Any) -> Match:
        return v if isinstance(v, Match) else parse_match(v)

    @field_validator("forward", mode="before")
    @classmethod
    def _names_are_forwards(cls, v: Any) -> Any:
        """``forward: [main-pacs]`` and ``forward: main-pacs`` are short for ``[{to: main-pacs}]``."""
        items = v if isinstance(v, (list, tuple)) else [v]
        return [{"to": item} if isinstance(item, str) else item for item in items]

    def keys(self) -> frozenset[str]:
        """The keywords (and calling_ae) this rule's match reads."""
        return self.match.keys()


@dataclass(frozen=True)
class Forward:
    """One destination of a decision and the private blocks its copy gets."""

    destination: str
    annotations: tuple[PrivateBlock, ...] = ()


@dataclass(frozen=True)
class Decision:
    """The rules that matched (file order), one Forward per destination, and whether to ingest."""

    matched: tuple[str, ...] = ()
    forwards: tuple[Forward, ...] = ()
    ingest: bool = False


class RoutingRules(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    destinations: dict[str, Destination] = Field(default_factory=dict)
    rules: tuple[Rule, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _destination_names(cls, data: Any) -> Any:
        """A destination is named by its key; a ``name`` field, if any, must say the same."""
        if isinstance(data, Mapping) and isinstance(data.get("destinations"), Mapping):
            named = {}
            for key, dest in data["destinations"].items():
                if isinstance(dest, Mapping) and dest.get("name", key) != key:
                    raise ValueError(f"destinations.{key}.name: differs from its key")
                named[key] = {**dest, "name": key} if isinstance(dest, Mapping) else dest
            data = {**data, "destinations": named}
        return data

    @model_validator(mode="after")
    def _references(self) -> RoutingRules:
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.name in seen:
                raise ValueError(f"rules[{i}].name: another rule has this name")
            seen.add(rule.name)
            for j, action in enumerate(rule.forward):
                if action.to not in self.destinations:
                    raise ValueError(f"rules[{i}].forward[{j}].to: no destination of that name")
        return self

    @classmethod
    def load(cls, path: Path) -> RoutingRules:
        """Read and check a rules file; any problem raises :class:`RulesError` (one line)."""
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise RulesError(f"{path}: cannot read it ({type(exc).__name__})") from None
        except UnicodeDecodeError:
            raise RulesError(f"{path}: not UTF-8 text") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise RulesError(f"{path}: not valid YAML{where}") from None
        if not isinstance(raw, Mapping):
            raise RulesError(f"{path}: must be a mapping with destinations and rules")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise RulesError(f"{path}: {_first_problem(exc)}") from None

    def decide(self, subject: Subject) -> Decision:
        """Every rule that matches ``subject`` acts; a destination named by several gets one copy
        with all their blocks. No match: the empty decision (nothing forwarded, not ingested)."""
        matched: list[str] = []
        blocks: dict[str, list[PrivateBlock]] = {}
        ingest = False
        for rule in self.rules:
            if not rule.match.holds(subject):
                continue
            matched.append(rule.name)
            ingest = ingest or rule.ingest
            for action in rule.forward:
                merged = blocks.setdefault(action.to, [])
                merged.extend(b for b in action.annotate if b not in merged)
        forwards = tuple(Forward(name, tuple(bs)) for name, bs in blocks.items())
        return Decision(tuple(matched), forwards, ingest)

    def keys(self) -> frozenset[str]:
        """Every keyword (and calling_ae) some rule reads."""
        return frozenset().union(*(rule.keys() for rule in self.rules))

    def restricted_to(self, keys: Iterable[str]) -> tuple[RoutingRules, tuple[str, ...]]:
        """The rules that read only ``keys``, and the names of those that need more."""
        known = frozenset(keys)
        kept = tuple(rule for rule in self.rules if rule.keys() <= known)
        left = tuple(rule.name for rule in self.rules if not rule.keys() <= known)
        return RoutingRules(destinations=self.destinations, rules=kept), left


def _first_problem(exc: ValidationError) -> str:
    """``field.path: reason`` of the first error; pydantic's input values are left out (they may
    be anything the file holds)."""
    err = exc.errors(include_input=False, include_url=False)[0]
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in err["loc"]).lstrip(".")
    message = str(err["msg"]).removeprefix("Value error, ")
    if message.startswith((".", "[")):  # parse_match names the path below the field
        return f"{path}{message}"
    return f"{path}: {message}" if path else message
