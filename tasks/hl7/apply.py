"""Apply one inbox message to FHIR: the Patient it describes, read, merged and written back.

* **Update or create.** The Patient is found by its identifier. Found: the message's resource is
  merged into it (``merge``: what a sparse A08 omits stays) and PUT with ``If-Match`` on the version
  read; a 409/412 means someone wrote it meanwhile, so it is read and merged again (a few times,
  then a transient :class:`FhirConflict`). Not found: a resource carrying an ``id`` (research mode:
  the id the imaging sync gives the same pseudonym) is PUT to that id; otherwise it is a conditional
  create (``ifNoneExist`` on the identifier), and a create that found one made meanwhile merges again.
* **A40.** The surviving Patient is updated or created as above; the merged one is found (or made
  as an inactive stub carrying its identifier); a repeat with the two swapped (the "survivor" was
  already replaced by the "merged" one) is refused for good. Then one transaction writes both with
  ``If-Match``: the survivor gets ``link`` replaces, the merged one ``active=false`` and ``link``
  replaced-by. Applying the same A40 again changes nothing.
* **Drain.** :func:`drain` hands the inbox's due messages (one per patient, in order) to ``apply_one``
  and records the outcome: applied, or failed (transient → retried with backoff; permanent → for good).

Only :class:`~pacsflow.tasks.fhir.client.FhirClient` speaks HTTP. Errors and logs name control ids,
events and resource ids, never a value of the message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pacsflow.tasks.core.errors import (
    FhirConfigurationError,
    FhirConflict,
    FhirRejected,
    PermanentError,
    TransientError,
)
from pacsflow.tasks.fhir.client import FhirClient
from pacsflow.tasks.fhir.mapping import Identity, same_content, version_of
from pacsflow.tasks.hl7.inbox import Inbox, InboxMessage
from pacsflow.tasks.hl7.mapping import (
    MappingConfig,
    MergePlan,
    Mode,
    PatientChange,
    is_swapped_repeat,
    merge_patient,
    merge_plan,
    patient_change,
)
from pacsflow.tasks.hl7.message import AdtMessage, parse_adt
from pacsflow.tasks.settings import Hl7Mode, Settings

log = logging.getLogger("pacsflow.hl7")

Resource = dict[str, Any]
CONFLICT_ROUNDS = 5


class MergeRefused(PermanentError):
    """An A40 we will not apply (a swapped repeat, one Patient named twice, an ambiguous identifier)."""

    reason = "hl7-merge-refused"


@dataclass(frozen=True)
class Hl7Mapper:
    """The mapping of one configuration: what the intake checks and the drain applies."""

    config: MappingConfig

    def change(self, msg: AdtMessage) -> PatientChange | MergePlan:
        return merge_plan(msg, self.config) if msg.event == "A40" else patient_change(msg, self.config)

    def check(self, msg: AdtMessage) -> None:
        """Map without writing: a mapping error becomes the intake's AE, before anything is stored."""
        self.change(msg)


def mapping_config(settings: Settings) -> MappingConfig:
    """The mapping of ``settings.hl7`` (research mode reads the de-identification key)."""
    hl7 = settings.hl7
    research = hl7.mode is Hl7Mode.RESEARCH
    return MappingConfig(
        mode=Mode(hl7.mode.value), identifier_systems=dict(hl7.identifier_systems),
        default_identifier_system=hl7.default_identifier_system, research_authority=hl7.research_authority or "",
        pseudonym_system=settings.fhir.pseudonym_system, key=settings.resolve_deid_key() if research else None)


# -- one Patient ------------------------------------------------------------------------------
def find_patient(client: FhirClient, identity: Identity) -> Resource | None:
    """The one Patient with this identifier, None when there is none."""
    found = client.search_by_identifier("Patient", [identity.token])
    if len(found) > 1:
        ids = ", ".join(sorted(str(p.get("id")) for p in found))
        raise MergeRefused(f"{len(found)} Patients carry one identifier ({ids}): merge them first")
    return found[0] if found else None


def _put_if_match(client: FhirClient, resource: Resource, version: str) -> Resource | None:
    """PUT ``resource`` to its id on ``version``: the Patient as written (its new version from the
    answer's ETag, no read), or None when the version moved on meanwhile (or the answer has no
    ETag: the caller reads it again)."""
    resp = client.put(f"Patient/{resource['id']}", resource, if_match=version)
    if resp.status_code in (409, 412):
        return None
    etag = resp.headers.get("ETag", "").removeprefix("W/").strip('"')
    return {**resource, "meta": {**resource.get("meta", {}), "versionId": etag}} if etag else None


def _create(client: FhirClient, identity: Identity, resource: Mapping[str, Any]) -> None:
    """Create the Patient: PUT to its id when it has one (research: the imaging sync's id), else a
    conditional create, which leaves one made meanwhile as it is (the caller reads and merges again)."""
    doc = {**resource, "resourceType": "Patient"}
    if doc.get("id"):
        client.put(f"Patient/{doc['id']}", doc)
        return
    entry = {"resource": doc, "request": {"method": "POST", "url": "Patient",
                                          "ifNoneExist": f"identifier={identity.token}"}}
    client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [entry]})


def ensure_patient(client: FhirClient, identity: Identity, resource: Mapping[str, Any]) -> Resource:
    """The Patient with this identity, created from ``resource`` when there is none."""
    found = find_patient(client, identity)
    if found is None:
        _create(client, identity, resource)
        found = find_patient(client, identity)
    if found is None:
        raise FhirConflict("Patient: created, but not found by its identifier afterwards")
    return found


def upsert_patient(client: FhirClient, change: PatientChange, *, fill_only: bool = False) -> Resource:
    """Merge ``change`` into its Patient (or create it); returns the Patient as it is now. Raises
    :class:`FhirConflict` when other writers keep winning the race. ``fill_only``: the message is
    older than one already applied, so it only adds what the Patient lacks."""
    for _ in range(CONFLICT_ROUNDS):
        # Created from the message when there is none (or found made meanwhile): then the merge
        # below changes nothing, unless someone else made it.
        existing = ensure_patient(client, change.identity, change.resource)
        merged = merge_patient(existing, change.update, fill_only=fill_only)
        if same_content(merged, existing):
            return existing
        written = _put_if_match(client, {**merged, "id": existing["id"]}, version_of(existing))
        if written is not None:
            return written
    raise FhirConflict(f"Patient: other writers kept changing it ({CONFLICT_ROUNDS} rounds)")


# -- A40 --------------------------------------------------------------------------------------
def merge_patients(client: FhirClient, plan: MergePlan, *, fill_only: bool = False) -> tuple[Resource, Resource]:
    """Apply an A40 (module docstring); returns (survivor, merged) as they are now. ``fill_only``
    (an older A40) holds for the survivor's demographics; the links and ``active`` are written."""
    if is_swapped_repeat(find_patient(client, plan.survivor.identity), find_patient(client, plan.merged), plan):
        raise MergeRefused("A40 repeated with the identifiers swapped: the surviving Patient is already "
                           "replaced by the merged one")
    for _ in range(CONFLICT_ROUNDS):
        survivor = upsert_patient(client, plan.survivor, fill_only=fill_only)
        stub = {**plan.merged_update(survivor["id"]), **_research_frame(plan)}
        merged = ensure_patient(client, plan.merged, stub)
        if survivor["id"] == merged["id"]:
            raise MergeRefused(f"A40 names one Patient twice (Patient/{survivor['id']})")
        new_s = {**merge_patient(survivor, plan.survivor_update(merged["id"]), fill_only=fill_only),
                 "id": survivor["id"]}
        new_m = {**merge_patient(merged, plan.merged_update(survivor["id"])), "id": merged["id"]}
        if same_content(new_s, survivor) and same_content(new_m, merged):
            return survivor, merged
        if _write_both(client, (new_s, version_of(survivor)), (new_m, version_of(merged))):
            return (find_patient(client, plan.survivor.identity) or new_s,
                    find_patient(client, plan.merged) or new_m)
    raise FhirConflict(f"A40: other writers kept changing the Patients ({CONFLICT_ROUNDS} rounds)")


def _research_frame(plan: MergePlan) -> Resource:
    """A merged Patient made by an A40 in research mode: the imaging sync's id and security label."""
    if plan.merged_id is None:
        return {}
    return {"id": plan.merged_id, "meta": plan.survivor.resource.get("meta", {})}


def _write_both(client: FhirClient, *docs: tuple[Resource, str]) -> bool:
    """One transaction: every Patient on the version read, or none. False on a version conflict."""
    entries = [{"resource": doc, "request": {"method": "PUT", "url": f"Patient/{doc['id']}",
                                             "ifMatch": f'W/"{version}"'}} for doc, version in docs]
    try:
        client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    except FhirConflict:
        return False
    except FhirRejected as exc:
        if exc.status == 412:
            return False
        raise
    return True


# -- the inbox ---------------------------------------------------------------------------------
def apply_message(client: FhirClient, raw: bytes, mapper: Hl7Mapper, *, older: bool = False) -> str:
    """Apply one stored message; returns the id of the Patient it wrote (the survivor for an A40).
    ``older``: a newer message of the patient was applied already, so this one only fills gaps."""
    change = mapper.change(parse_adt(raw))
    if isinstance(change, MergePlan):
        return str(merge_patients(client, change, fill_only=older)[0]["id"])
    return str(upsert_patient(client, change, fill_only=older)["id"])


def drain(inbox: Inbox, apply_one: Callable[[InboxMessage], str], limit: int = 50) -> int:
    """Apply the due messages (one per patient, oldest first) and record each outcome; returns how
    many were handed out. A configuration error (401, 403, 404, ...) is retried like an outage: the
    messages wait for the fix rather than fail for good."""
    batch = inbox.next_batch(limit)
    for msg in batch:
        what = f"{msg.control_id} {msg.event}"
        try:
            patient_id = apply_one(msg)
        except (TransientError, FhirConfigurationError) as exc:
            row = inbox.mark_failed(msg.control_id, f"{type(exc).__name__}: {exc}", transient=True)
            later = row is not None and row.state.value == "pending"
            log.warning("HL7 %s not applied (%s)%s", what, type(exc).__name__,
                        f"; retry {row.attempts}" if later and row else "; failed for good (pacsflow hl7 replay)")
        except PermanentError as exc:
            inbox.mark_failed(msg.control_id, f"{type(exc).__name__}: {exc}", transient=False)
            log.error("HL7 %s failed for good: %s", what, exc)
        except Exception as exc:  # noqa: BLE001 - a bug fails this message, not the drain; no text (it may quote data)
            inbox.mark_failed(msg.control_id, f"{type(exc).__name__} (a defect)", transient=False)
            log.error("HL7 %s failed for good: %s", what, type(exc).__name__)
        else:
            inbox.mark_applied(msg.control_id)
            log.info("HL7 %s applied to Patient/%s%s", what, patient_id,
                     " (older than one applied before: filled gaps only)" if msg.older else "")
    return len(batch)
