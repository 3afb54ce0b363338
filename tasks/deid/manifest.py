"""The de-identification manifest of a run: table edition, recipe, options, counts by action and
the quarantined objects by opaque id. No PHI, no timestamps (identical on rerun). Also the Prefect
artifact's Markdown."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from pacsflow.tasks.deid import iod as deid_iod
from pacsflow.tasks.deid.deidentifier import RECIPE_VERSION, DeidReport, Deidentifier, load_profile


MANIFEST_NAME = "deid-manifest.json"


MANIFEST_VERSION = 1


@dataclass
class QuarantinedObject:
    id: str
    reason: str


def build_manifest(
    deid: Deidentifier, report: DeidReport, quarantined: Iterable[QuarantinedObject], written: int,
    files: int | None = None, quarantined_count: int | None = None,
) -> dict[str, Any]:
    """The per-run de-identification manifest (also the Prefect artifact's content). No PHI.
    ``quarantined_count``: how many were quarantined when ``quarantined`` lists only some."""
    quarantined = list(quarantined)
    quarantined_count = len(quarantined) if quarantined_count is None else quarantined_count
    return {
        "manifest_version": MANIFEST_VERSION,
        "profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile",
        "table_edition": load_profile().edition,
        "recipe_version": RECIPE_VERSION,
        "iod_types_source": deid_iod.table_source(),
        "options": [o.value for o in deid.options],
        "method_codes": [c for c, _ in deid.method_codes()],
        "pixel_policy": deid.pixel_policy.value if deid.pixel_policy is not None else "not checked",
        "residual_phi_audit": deid.audit,
        "site_recipe": deid.recipe.describe() if deid.recipe is not None else None,
        "files": files if files is not None else written + quarantined_count,
        "written": written,
        "quarantined_count": quarantined_count,
        "actions": dict(sorted(report.actions.items())),
        "quarantined": [asdict(q) for q in sorted(quarantined, key=lambda q: q.id)],
    }


def manifest_markdown(manifest: dict[str, Any]) -> str:
    """The manifest as Markdown for ``prefect.artifacts.create_markdown_artifact``."""
    lines = [
        "# De-identification manifest",
        "",
        f"- profile: {manifest['profile']}, Table E.1-1 edition {manifest['table_edition']}",
        f"- recipe: {manifest['recipe_version']}",
        f"- options: {', '.join(manifest['options']) or 'none'}",
        f"- method codes: {', '.join(manifest['method_codes'])}",
        f"- pixel policy: {manifest['pixel_policy']}; residual-PHI audit: {manifest['residual_phi_audit']}",
        f"- site recipe: {_site_recipe(manifest.get('site_recipe'))}",
        f"- objects: {manifest['files']} seen, {manifest['written']} written, {manifest['quarantined_count']} quarantined",
        "",
        "| action | count |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in manifest["actions"].items()]
    if manifest["quarantined"]:
        lines += ["", "| quarantined object | reason |", "|---|---|"]
        lines += [f"| {q['id']} | {q['reason']} |" for q in manifest["quarantined"]]
    return "\n".join(lines) + "\n"


def _site_recipe(recipe: dict[str, Any] | None) -> str:
    if not recipe:
        return "none"
    keep = "KEEP allowed" if recipe["may_keep"] else "KEEP ignored"
    return f"{recipe['file']} (sha256 {recipe['sha256'][:16]}, {recipe['header_actions']} header actions, {keep})"


def object_id(key: bytes, rel: str) -> str:
    """An opaque, keyed name for an object in manifests (never its path or UIDs)."""
    return "q-" + hmac.new(key, b"object\x00" + rel.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:20]
