"""The settings model rendered for people: the README's reference table and the commented YAML
file that ``pacsflow init`` writes.

Both walk ``Settings.model_fields`` (nested models too) and take each line of text from the
field's description, so neither can drift from the model. Regenerate the README's table with
``python -m pacsflow.tasks.settings_reference README.md`` (``pacsflow settings --reference``
prints it).
"""

from __future__ import annotations

import inspect
import json
import sys
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from pacsflow.tasks.settings import Settings

ENV_PREFIX = "PACSFLOW_"
ENV_NESTED = "__"
README_START = "<!-- settings-reference:start (generated: python -m pacsflow.tasks.settings_reference README.md) -->"
README_END = "<!-- settings-reference:end -->"


@dataclass(frozen=True)
class SettingEntry:
    """One leaf setting: where it sits, its default (JSON-ready) and what it means."""

    path: tuple[str, ...]
    models: tuple[type[BaseModel], ...]  # the models along the path, Settings first
    default: Any
    computed: bool  # the default is computed when the settings load (e.g. from the CPU count)
    secret: bool
    description: str

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + ENV_NESTED.join(part.upper() for part in self.path)


def _nested_model(field: FieldInfo) -> type[BaseModel] | None:
    annotation = field.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _is_secret(field: FieldInfo) -> bool:
    return field.annotation is SecretStr or SecretStr in typing.get_args(field.annotation)


def _default(field: FieldInfo) -> tuple[Any, bool]:
    """(JSON-ready default, computed?). A factory that makes an empty or fixed container is a
    plain default; one that makes a scalar depends on the machine (deid_workers: the CPUs)."""
    if field.default_factory is not None:
        value = field.get_default(call_default_factory=True)
        return to_jsonable_python(value), not isinstance(value, (list, dict, tuple, set))
    value = None if field.default is PydanticUndefined else field.default
    return to_jsonable_python(value), False


def setting_entries(model: type[BaseModel] = Settings, path: tuple[str, ...] = (),
                    models: tuple[type[BaseModel], ...] = (), given: BaseModel | None = None) -> list[SettingEntry]:
    """Every leaf setting of ``model`` in declaration order, nested models expanded in place.
    ``given``: the parent's default instance of ``model``, whose values win over the model's own
    (``xdsi.class_code`` defaults to IMAGES although an ``XdsCode`` has no default code)."""
    models = models or (model,)
    entries: list[SettingEntry] = []
    for name, field in model.model_fields.items():
        nested = _nested_model(field)
        if nested is not None:
            instance = field.default if isinstance(field.default, BaseModel) else None
            entries += setting_entries(nested, (*path, name), (*models, nested), instance)
            continue
        default, computed = _default(field)
        if given is not None:
            default = to_jsonable_python(getattr(given, name))
        entries.append(SettingEntry(path=(*path, name), models=models, default=default, computed=computed,
                                    secret=_is_secret(field), description=field.description or ""))
    return entries


def model_summary(model: type[BaseModel]) -> str:
    """The first paragraph of a settings model's docstring, on one line."""
    paragraph = inspect.cleandoc(model.__doc__ or "").split("\n\n")[0]
    return " ".join(paragraph.split()).replace("``", "`")


# -- the README's table --------------------------------------------------------------------------
def _table_value(entry: SettingEntry) -> str:
    if entry.secret:
        return "unset (secret)"
    if entry.computed:
        return "computed"
    if entry.default is None:
        return "unset"
    text = entry.default if isinstance(entry.default, str) else json.dumps(entry.default, ensure_ascii=False)
    return f"`{text}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_table() -> str:
    """Every setting as a markdown table: name, environment variable, default, meaning."""
    lines = ["| setting | environment variable | default | meaning |", "|---|---|---|---|"]
    for e in setting_entries():
        lines.append(f"| `{e.name}` | `{e.env_var}` | {_cell(_table_value(e))} | {_cell(e.description)} |")
    return "\n".join(lines) + "\n"


def readme_with_reference(readme: str) -> str:
    """``readme`` with the text between the reference markers replaced by :func:`reference_table`."""
    head, start, rest = readme.partition(README_START)
    _, end, tail = rest.partition(README_END)
    if not start or not end:
        raise ValueError("the README has no settings-reference markers")
    return f"{head}{README_START}\n{reference_table()}{README_END}{tail}"


# -- the commented YAML of ``pacsflow init`` -----------------------------------------------------------
def _comment(text: str, pad: str) -> list[str]:
    return [f"{pad}# {line}" for line in textwrap.wrap(text, width=100 - len(pad))]


def _section_headers(previous: tuple[str, ...], current: SettingEntry) -> list[str]:
    section = current.path[:-1]
    same = 0
    while same < min(len(previous), len(section)) and previous[same] == section[same]:
        same += 1
    lines: list[str] = []
    for depth in range(same, len(section)):
        pad = "  " * depth
        lines += ["", *_comment(model_summary(current.models[depth + 1]), pad), f"{pad}{section[depth]}:"]
    if not lines and len(section) < len(previous):
        lines.append("")  # back out of a section: a blank line before the parent's next setting
    return lines


def _yaml_setting(entry: SettingEntry, value: Any) -> list[str]:
    pad = "  " * (len(entry.path) - 1)
    name = entry.path[-1]
    lines = _comment(entry.description, pad)
    if entry.secret:
        lines.append(f"{pad}# {name}: never written to a file; set {entry.env_var} or use a Prefect Secret block")
    elif entry.computed:
        lines.append(f"{pad}# {name}: {json.dumps(value)}  (computed on this machine when unset)")
    else:
        lines.append(f"{pad}{name}: {json.dumps(value, ensure_ascii=False)}")
    return lines


def commented_config(values: dict[str, Any] | None = None, header: str = "") -> str:
    """A YAML settings file holding every setting (``values`` by dotted name, else its default),
    each under a comment from its description. Secrets are never written; values are JSON
    scalars and lists, which YAML reads as they are."""
    values = values or {}
    lines = [*(f"# {line}" if line else "#" for line in header.splitlines())]
    previous: tuple[str, ...] = ()
    for entry in setting_entries():
        lines += _section_headers(previous, entry)
        lines += _yaml_setting(entry, to_jsonable_python(values.get(entry.name, entry.default)))
        previous = entry.path[:-1]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``python -m pacsflow.tasks.settings_reference [README.md]``: rewrite the README's table in
    place, or print the table."""
    if not argv:
        sys.stdout.write(reference_table())
        return 0
    readme = Path(argv[0])
    readme.write_text(readme_with_reference(readme.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
