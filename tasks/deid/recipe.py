"""A site's ``deid`` recipe (pydicom/deid format) as overrides on top of the PS3.15 profile.

Sites already keep recipe files for the ``deid`` package: ``%header`` actions on fields (keywords,
tags, ``contains:``/``startswith:``/``endswith:``/``select:`` expanders, ``values:`` and ``fields:``
lists, private tags with their creator) and ``%filter`` sections (whitelist/graylist/blacklist
with the burned-in regions of known devices). The file is parsed by deid's own parser and its
fields are matched by deid's own expanders, so a recipe means here what it means in deid.

Precedence (the conformance statement of this module):

1. **The profile first.** Table E.1-1 with the selected options is applied as always.
2. **The recipe can only tighten.** Its ``%header`` actions then run on the de-identified
   object, in file order: REMOVE deletes (a ``func:`` condition is not evaluated: the field is
   removed), BLANK empties, REPLACE writes the recipe's literal value, JITTER moves DA/DT values
   that are still present by the given whole days, ADD writes a standard attribute at the top
   level. As in deid, a field that a REPLACE or JITTER names is not removed by a REMOVE.
   A value deid would compute (``func:``, ``deid_func:``, ``var:``) is never computed, since
   those read the original header: REPLACE and JITTER with one blank the field instead, ADD with
   one is skipped; each is counted in the manifest.
3. **KEEP never undoes the profile by default.** A KEEP of an attribute the profile removes,
   empties, dummies, remaps or cleans is ignored, logged once per attribute (its keyword only)
   and counted in the manifest as ``recipe KEEP ignored: <keyword>``. With the explicit
   setting ``deid.recipe_may_keep`` the profile does not touch the top-level attributes a KEEP
   names: they are set aside before the profile, put back after the recipe's other actions
   (KEEP wins over them, as in deid), counted as ``recipe KEEP: <keyword>``, and the option is
   recorded in the manifest and in DeidentificationMethod. Kept values are not searched for by
   the residual-PHI audit or the descriptor cleaning (they are out of the profile's hands);
   values of other attributes found in them still are. A KEEP inside a sequence is ignored.
4. **Protected attributes.** The recipe never changes what the pipeline itself writes or needs:
   PatientID and PatientName (pseudonyms), the SOP Class/Instance, Study and Series UIDs (keys
   of the lake, remapped by the profile), the de-identification method attributes, the
   character set and the Image Pixel module. Actions on them are skipped and counted as
   ``recipe protected: <keyword>``.

``%filter`` sections are not applied here: :meth:`SiteRecipe.filters` hands deid's parsed
structure to the pixel policy, and :meth:`SiteRecipe.deid_recipe` a ``DeidRecipe`` for deid's
own detection functions.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from pacsflow.tasks.core.errors import DeidentificationError
from pacsflow.tasks.core.values import int_or_none, items_of

log = logging.getLogger(__name__)

SETTING = "deid.recipe_file"
_ACTIONS = ("ADD", "BLANK", "JITTER", "KEEP", "REPLACE", "REMOVE")
_COMPUTED = re.compile(r"^\s*(func|deid_func|var):", re.IGNORECASE)
_INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"FL", "FD"})
_NO_LITERAL_VRS = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "AT"})
_PROTECTED = frozenset(
    BaseTag(t) for t in (
        0x00080005, 0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00100010, 0x00100020,  # charset, keys
        0x00120062, 0x00120063, 0x00120064, 0x00280303,  # method attributes, LongitudinalTemporal...
        0x00280002, 0x00280004, 0x00280006, 0x00280008, 0x00280010, 0x00280011, 0x00280100, 0x00280101,
        0x00280102, 0x00280103, 0x7FE00010, 0x7FE00008, 0x7FE00009,  # Image Pixel module, pixel data
    )
)
_logged: set[str] = set()  # per process: one log line per ignored KEEP, not one per object


@dataclass(frozen=True)
class HeaderAction:
    action: str
    field: str
    value: str | None = None

    @property
    def computed(self) -> bool:
        """The value is one deid would compute from the original header (never done here)."""
        return self.value is not None and bool(_COMPUTED.match(self.value))


@dataclass(frozen=True)
class SiteRecipe:
    """A parsed site recipe: picklable (worker processes get it as is, no file re-read)."""

    name: str  # file name only: never a path
    sha256: str  # of the file's bytes
    may_keep: bool
    header: tuple[HeaderAction, ...]
    parsed: dict[str, Any] = field(repr=False)  # deid's structure (format, filter, values, fields)

    def filters(self) -> dict[str, list[dict[str, Any]]]:
        """The ``%filter`` sections as deid parses them (a copy): list name (``whitelist``,
        ``graylist``, ``blacklist``, ...) -> groups ``{"name": label, "filters": [{"action":
        [...], "field": [...], "value": [...], "operator": ..., "InnerOperators": [...]}],
        "coordinates": [[0 (mask) | 1 (keep), "xmin,ymin,xmax,ymax" | "all" | "from:Field"]]}``.
        CTP coordinates are already converted to (xmin, ymin, xmax, ymax)."""
        return copy.deepcopy(dict(self.parsed.get("filter") or {}))

    def deid_recipe(self) -> Any:
        """A ``deid.config.DeidRecipe`` of this recipe, for deid's own pixel functions
        (``deid.dicom.pixels.has_burned_pixels(..., deid=...)``)."""
        from deid.config import DeidRecipe

        return DeidRecipe(deid=copy.deepcopy(self.parsed), base=False)

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the recipe (no path, no values)."""
        return {
            "file": self.name,
            "sha256": self.sha256,
            "may_keep": self.may_keep,
            "header_actions": len(self.header),
            "filters": sorted(self.parsed.get("filter") or {}),
        }

    def method_values(self) -> list[str]:
        """DeidentificationMethod values (LO, <= 64 characters each)."""
        values = [f"site recipe {self.name[:24]} sha256:{self.sha256[:16]}"]
        if self.may_keep:
            values.append("site recipe KEEP allowed")
        return values

    def before_profile(self, ds: Dataset, profile_action: Callable[[int], str], report: Any) -> "Staged":
        """Run on the original object, before the profile: resolve KEEP (set aside with the
        option, else ignored and counted) and read the ``%values`` lists from the original
        values. ``profile_action(tag)`` is the profile's action code for a standard tag."""
        staged = Staged(self)
        keeps = [a for a in self.header if a.action == "KEEP"]
        values_lists = self.parsed.get("values") or {}
        if not keeps and not values_lists:
            return staged
        from deid.dicom.fields import expand_field_expression
        from deid.dicom.groups import extract_values_list

        fields, where = _fields(ds)
        for name, actions in values_lists.items():
            staged.values[name] = sorted(str(v) for v in extract_values_list(ds, actions, fields) if str(v))
        for keep in keeps:
            for uid in expand_field_expression(keep.field, ds, fields):
                parent, tag = where[uid]
                staged.keep(ds, parent, tag, profile_action, report)
        return staged


@dataclass
class Staged:
    """One object's recipe state between the two hooks (original values in memory only)."""

    recipe: SiteRecipe
    held: dict[BaseTag, Any] = field(default_factory=dict)
    values: dict[str, list[str]] = field(default_factory=dict)

    def keep(self, ds: Dataset, parent: Dataset, tag: BaseTag, profile_action: Callable[[int], str],
             report: Any) -> None:
        name = _name(tag)
        if tag in _PROTECTED and parent is ds:
            report.count(f"recipe protected: {name}")
        elif not _profile_touches(parent._dict[tag], profile_action):
            return  # the profile keeps it anyway
        elif self.recipe.may_keep and parent is ds and tag not in self.held:
            self.held[tag] = ds._dict.pop(tag)
            report.count(f"recipe KEEP: {name}")
        elif tag not in self.held:
            report.count(f"recipe KEEP ignored: {name}")
            if name not in _logged:
                _logged.add(name)
                where = "inside a sequence" if parent is not ds else "without deid.recipe_may_keep"
                log.warning("site recipe: KEEP %s ignored %s (the profile de-identifies it)", name, where)

    def after_profile(self, ds: Dataset, report: Any) -> None:
        """Run on the de-identified object, before the method attributes and file meta are
        written: the recipe's other header actions, then the set-aside KEEPs put back."""
        actions = [a for a in self.recipe.header if a.action != "KEEP"]
        if actions:
            _apply(ds, actions, self, report)
        for tag, elem in self.held.items():
            ds._dict[tag] = elem


def load_recipe(path: Path | str, may_keep: bool = False) -> SiteRecipe:
    """Parse a deid recipe file with deid's parser; any problem is a one-line
    DeidentificationError naming ``deid.recipe_file`` (and a line number, never its text)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DeidentificationError(f"{SETTING}: cannot read {path.name} ({type(exc).__name__})") from None
    lines = data.decode("utf-8", "replace").splitlines()
    if not any(re.match(r"\s*FORMAT\s+dicom\s*$", line, re.IGNORECASE) for line in lines):
        raise DeidentificationError(f"{SETTING}: {path.name} is not a deid recipe (it needs a 'FORMAT dicom' line)")
    parsed, complaints = _parse_with_deid(path)
    for message in complaints:
        raise DeidentificationError(f"{SETTING}: {path.name} is not a valid deid recipe{_line_of(message, lines)}")
    if not parsed:
        raise DeidentificationError(f"{SETTING}: {path.name} is not a valid deid recipe")
    header = tuple(HeaderAction(a["action"].upper(), a["field"], a.get("value")) for a in parsed.get("header") or ())
    for n, action in enumerate(header, 1):
        problem = _check(action)
        if problem:
            raise DeidentificationError(f"{SETTING}: {path.name}: %header action {n} ({action.action}) {problem}")
    return SiteRecipe(path.name, hashlib.sha256(data).hexdigest(), may_keep, header, dict(parsed))


def _parse_with_deid(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """deid's parser, muted: it prints and calls ``sys.exit`` on errors, and skips lines it does
    not recognise with a warning. Returns the parsed recipe and those complaints."""
    from deid.config import DeidRecipe
    from deid.logger import bot

    level, mark = bot.level, len(bot.history)
    bot.level = 0  # deid's QUIET: messages only go to its history
    parsed = None
    try:
        parsed = DeidRecipe(deid=str(path), base=False).deid
    except SystemExit:
        pass
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        bot.history.append(f"ERROR {type(exc).__name__}")
    finally:
        bot.level = level
        messages = bot.history[mark:]
        del bot.history[mark:]
    complaints = [m for m in messages if "ERROR" in m or "not recognized" in m or "not valid" in m
                  or "Problem loading" in m]
    if parsed is None and not complaints:
        complaints.append("unreadable")
    return parsed, complaints


def _line_of(message: str, lines: list[str]) -> str:
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text and (text in message or text.lstrip("%") + " is not" in message):
            return f" (line {n})"
    return ""


def _check(action: HeaderAction) -> str | None:
    if action.action not in _ACTIONS:
        return "is not supported"
    if action.action == "ADD":
        tag = _standard_tag(action.field)
        if tag is None:
            return "needs a standard attribute keyword or tag"
        if not action.computed and dictionary_VR(tag) in _NO_LITERAL_VRS:
            return "cannot write a literal value into a sequence or binary attribute"
    if action.action == "JITTER" and not action.computed and int_or_none(action.value) is None:
        return "needs a whole number of days"
    return None


def _standard_tag(text: str) -> BaseTag | None:
    text = text.strip()
    found = tag_for_keyword(text)
    if found is None:
        match = re.fullmatch(r"\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?", text)
        found = int(match.group(1) + match.group(2), 16) if match else None
    if found is None or (found >> 16) & 1:
        return None
    try:
        dictionary_VR(found)
    except KeyError:
        return None
    return BaseTag(found)


def _name(tag: BaseTag) -> str:
    return keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})"


def _profile_touches(elem: Any, profile_action: Callable[[int], str]) -> bool:
    tag = int(elem.tag)
    group = tag >> 16
    if group & 1 or (group & 0xFF00) in (0x5000, 0x6000) or elem.VR == "SQ":
        return True  # private, overlays, curves and sequences' contents are the profile's to change
    return profile_action(tag) != "K"


def _fields(ds: Dataset) -> tuple[Any, dict[str, tuple[Dataset, BaseTag]]]:
    """Every element, nested ones included, as deid's fields (same uid and name scheme as
    deid's own listing, which needs a file-read dataset and caches it for good), and where
    each one lives."""
    from deid.dicom.fields import DicomField, FieldsWithLookups

    found: dict[str, Any] = {}
    where: dict[str, tuple[Dataset, BaseTag]] = {}
    pending: list[tuple[Dataset, str, str]] = [(ds, "", "")]
    while pending:
        item, uid_prefix, name_prefix = pending.pop(0)
        for tag in list(item._dict):
            elem = item[tag]  # a converted element: deid reads keyword, name and private creator
            uid, name = f"{uid_prefix}{elem.tag}", f"{name_prefix}{elem.keyword}"
            found[uid] = DicomField(elem, name, uid)
            where[uid] = (item, BaseTag(tag))
            if elem.VR == "SQ":
                pending += [(sub, f"{uid}__{i}__", f"{name}__") for i, sub in enumerate(elem.value or ())]
    return FieldsWithLookups(found), where


def _matches(action: HeaderAction, ds: Dataset, fields: Any, staged: Staged) -> list[str]:
    from deid.dicom.fields import expand_field_expression
    from deid.dicom.groups import extract_fields_list

    spec = action.field
    if spec.lower().startswith("values:"):
        wanted = staged.values.get(spec[7:], [])
        if not wanted:
            return []
        pattern = "|".join(re.escape(v) for v in wanted)  # deid's lists are regular expressions: not ours
        return [uid for uid, f in fields.items() if f.element.VR != "SQ" and f.value_contains(pattern)]
    if spec.lower().startswith("fields:"):
        listed = extract_fields_list(ds, (staged.recipe.parsed.get("fields") or {}).get(spec[7:], []), fields)
        out: list[str] = []
        for contender in listed.values():
            out += list(expand_field_expression(contender.stripped_tag, ds, fields))
        return out
    return list(expand_field_expression(spec, ds, fields))


def _apply(ds: Dataset, actions: list[HeaderAction], staged: Staged, report: Any) -> None:
    fields, where = _fields(ds)
    matched = [(a, _matches(a, ds, fields, staged)) for a in actions if a.action != "ADD"]
    spared = {uid for a, uids in matched if a.action in ("REPLACE", "JITTER") for uid in uids}
    added = iter(a for a in actions if a.action == "ADD")
    for action in actions:
        if action.action == "ADD":
            _add(ds, next(added), report)
            continue
        act, uids = matched.pop(0)
        for uid in uids:
            parent, tag = where[uid]
            if tag not in parent._dict:
                continue  # removed with its sequence, or by an earlier action
            if parent is ds and tag in _PROTECTED:
                report.count(f"recipe protected: {_name(tag)}")
            elif not (act.action == "REMOVE" and uid in spared):
                _change(parent, tag, act, report)


def _change(parent: Dataset, tag: BaseTag, action: HeaderAction, report: Any) -> None:
    elem = parent[tag]
    vr = elem.VR
    verb = action.action
    if verb in ("REPLACE", "JITTER") and action.computed:
        verb = "BLANK"
        report.count("recipe computed value blanked")
    if verb == "REMOVE":
        del parent._dict[tag]
    elif verb == "JITTER":
        if vr in ("DA", "DT") and elem.value:
            parent._dict[tag] = DataElement(tag, vr, _jittered(elem.value, vr, int_or_none(action.value) or 0))
        else:
            return
    else:
        value = _literal(vr, action.value) if verb == "REPLACE" else None
        if value is None:
            verb = "BLANK"
        parent._dict[tag] = DataElement(tag, vr, Sequence() if vr == "SQ" else value)
    report.count(f"recipe {verb}")


def _add(ds: Dataset, action: HeaderAction, report: Any) -> None:
    tag = _standard_tag(action.field)
    if tag is None:
        return  # refused when the recipe was loaded
    if tag in _PROTECTED:
        report.count(f"recipe protected: {_name(tag)}")
    elif action.computed:
        report.count("recipe ADD skipped (computed value)")
    else:
        vr = dictionary_VR(tag).split(" or ")[0]
        ds._dict[tag] = DataElement(tag, vr, _literal(vr, action.value))
        report.count("recipe ADD")


def _literal(vr: str, text: str | None) -> Any:
    """The recipe's text as a value of the VR; None (blank) when it cannot be one."""
    if text is None or vr in _NO_LITERAL_VRS:
        return None
    parts = [p.strip() for p in text.strip().split("\\")]
    try:
        if vr in _INT_VRS:
            numbers: list[Any] = [int(p) for p in parts]
        elif vr in _FLOAT_VRS:
            numbers = [float(p) for p in parts]
        else:
            return text.strip()
    except ValueError:
        return None
    return numbers if len(numbers) > 1 else numbers[0]


def _jittered(value: Any, vr: str, days: int) -> Any:
    """DA/DT values moved by whole days; a value that is not a date is dropped."""
    moved: list[str] = []
    for v in items_of(value):
        text = str(v).strip()
        try:
            day = dt.date(int(text[0:4]), int(text[4:6]), int(text[6:8])) + dt.timedelta(days=days)
        except (ValueError, OverflowError):
            continue
        moved.append(day.strftime("%Y%m%d") + (text[8:] if vr == "DT" else ""))
    return (moved if len(moved) > 1 else moved[0]) if moved else None
