"""Attribute types (1, 1C, 2, 2C, 3) by IOD, for the "unless required" actions of Table E.1-1.

Z/D, X/Z, X/D, X/Z/D and X/Z/U* choose by the attribute's Type in the object's IOD. pydicom has
no module tables, so the types come from a compact table generated from the DICOM standard's
IOD and module definitions as shipped in the PyPI package ``dicom-standard`` 0.1.0 (Innolitics'
JSON transcription of PS3.3; MIT licence; parsed from the 2020 web edition). Only what the
profile needs is kept: for every IOD, the type of each combined-action attribute at each
sequence path where the IOD defines it (macros and functional groups expanded).

Regenerate with::

    .venv/bin/pip install dicom-standard==0.1.0
    .venv/bin/python -m pacsflow.tasks.deid.iod .venv/standard

The package is only needed to regenerate; at run time the table is read from ``tasks/deid/data``.

Choice rules (``choose``), for an attribute whose action is combined:
- IOD known, attribute defined at this path: Type 1/1C -> D (U for X/Z/U*), Type 2/2C -> Z,
  Type 3 -> X; the strongest type wins when several modules define the same path.
- IOD known, attribute not defined at this path (a Standard Extended or private context) -> X
  (Z for Z/D, which never removes).
- IOD unknown (a SOP class missing from the table): the conformant choice whatever the type,
  D over Z over X (U for X/Z/U*), which never keeps an original value.
"""

from __future__ import annotations

import json
import sys
from functools import cache
from importlib import resources
from pathlib import Path

IOD_RESOURCE = "iod-attribute-types.json"

COMBINED = ("Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*")
_RANK = {"3": 1, "2C": 2, "2": 3, "1C": 4, "1": 5}
_FG_SEQUENCES = ("52009229", "52009230")  # Shared / Per-frame Functional Groups Sequence


@cache
def _table() -> dict:
    with resources.files("pacsflow.tasks.deid").joinpath("data", IOD_RESOURCE).open("r", encoding="utf-8") as fh:
        return json.load(fh)


def table_source() -> str:
    return _table()["source"]


@cache
def types_for_sop_class(sop_class_uid: str) -> dict[str, str] | None:
    """Path ("TTTTTTTT" or "SSSSSSSS:TTTTTTTT", upper-case hex) -> type, or None for an unknown IOD."""
    t = _table()
    ciod = t["sop_classes"].get(sop_class_uid)
    if ciod is None:
        return None
    out: dict[str, str] = {}
    for module in t["ciods"][ciod]["modules"]:
        for path, typ in t["modules"][module].items():
            _keep_strongest(out, path, typ)
    for macro in t["ciods"][ciod].get("fg_macros", ()):
        for path, typ in t["macros"][macro].items():
            for fg in _FG_SEQUENCES:
                _keep_strongest(out, f"{fg}:{path}", typ)
    return out


def _keep_strongest(types: dict[str, str], path: str, typ: str) -> None:
    """Where several modules define the same path, the strongest type wins."""
    if _RANK.get(typ, 0) > _RANK.get(types.get(path, ""), 0):
        types[path] = typ


def choose(code: str, attr_type: str | None, iod_known: bool) -> str:
    """The single action (X, Z, D or U) a combined code resolves to for this attribute type."""
    if not iod_known:
        if code == "X/Z/U*":
            return "U"
        return "Z" if code == "X/Z" else "D"
    if attr_type is None:
        return "Z" if code == "Z/D" else "X"
    rank = _RANK.get(attr_type, 1)
    if rank >= 4:  # Type 1 / 1C
        if code == "X/Z/U*":
            return "U"
        return "Z" if code == "X/Z" else "D"
    if rank >= 2:  # Type 2 / 2C
        return "D" if code == "X/D" else "Z"
    return "Z" if code == "Z/D" else "X"


# -- generation (developer tool, not used at run time) -------------------------------------
def generate(standard_dir: Path, profile_json: Path, out: Path) -> None:
    profile = json.loads(profile_json.read_text(encoding="utf-8"))
    wanted = set()
    for row in profile["attributes"]:
        codes = {row["basic"], *(row.get("options") or {}).values()}
        if codes & set(COMBINED) and row["tag"][1:5].upper() != "GGGG":
            wanted.add((row["tag"][1:5] + row["tag"][6:10]).upper())

    def load(name: str) -> list:
        return json.loads((standard_dir / name).read_text(encoding="utf-8"))

    def path_of(path: str) -> str | None:
        parts = [p.upper() for p in path.split(":")[1:]]
        return ":".join(parts) if parts and parts[-1] in wanted else None

    def strongest_types(rows: list, owner: str) -> dict[str, dict[str, str]]:
        """Module or macro id -> {path: the strongest type defined there}."""
        out: dict[str, dict[str, str]] = {}
        for row in rows:
            p = path_of(row["path"])
            if p and row["type"] in _RANK:
                _keep_strongest(out.setdefault(row[owner], {}), p, row["type"])
        return out

    modules = strongest_types(load("module_to_attributes.json"), "moduleId")
    macros = strongest_types(load("macro_to_attributes.json"), "macroId")
    ciods: dict[str, dict[str, list[str]]] = {}
    for row in load("ciod_to_modules.json"):
        entry = ciods.setdefault(row["ciodId"], {"modules": []})
        if row["moduleId"] in modules:
            entry["modules"].append(row["moduleId"])
    for row in load("ciod_to_fg_macros.json"):
        entry = ciods.setdefault(row["ciodId"], {"modules": []})
        if row["macroId"] in macros:
            entry.setdefault("fg_macros", []).append(row["macroId"])
    name_to_id = {c["name"]: c["id"] for c in load("ciods.json")}
    sops = {s["id"]: name_to_id[s["ciod"]] for s in load("sops.json") if s["ciod"] in name_to_id}
    used_macros = {m for c in ciods.values() for m in c.get("fg_macros", ())}
    table = {
        "source": "dicom-standard 0.1.0 (PyPI; Innolitics JSON of DICOM PS3.3, 2020 web edition); "
        "generated by pacsflow.tasks.deid.iod for the combined-action attributes of PS3.15 Table E.1-1 "
        + profile["edition"],
        "sop_classes": dict(sorted(sops.items())),
        "ciods": dict(sorted(ciods.items())),
        "modules": {k: dict(sorted(v.items())) for k, v in sorted(modules.items())},
        "macros": {k: dict(sorted(v.items())) for k, v in sorted(macros.items()) if k in used_macros},
    }
    out.write_text(json.dumps(table, indent=0, sort_keys=False) + "\n", encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover - developer tool
    here = Path(__file__).resolve().parent / "data"
    generate(Path(sys.argv[1]), here / "ps3.15-table-e1-1-2024b.json", here / IOD_RESOURCE)
