"""pacsflow's Prefect events: what the listener tells Prefect, and what deployment triggers match.

``pacsflow.study.routed`` (:func:`emit_study_routed`): the listener routed a stable study; the payload
says how many objects each destination was queued, so operators see routed studies in the
Prefect UI's event feed next to the ingest runs.

``pacsflow.study.stable`` (:func:`emit_study_stable`): a pushed study had no new object for the
stability window and its new objects wait in the hand-off folder
(:func:`pacsflow.tasks.ingest.handoff.handoff_dir`). The ``ingest-study`` deployment's trigger in
``prefect.yaml`` starts the flow for it. Nothing identifying goes out: the resource is the keyed
study pseudonym, the payload holds counts and modalities.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping

from prefect.events import emit_event

from pacsflow.tasks.ingest.handoff import (
    GENERATION_LABEL,
    STABLE_EVENT,
    check_generation,
    handoff_root,
    study_resource_id,
)
from pacsflow.tasks.settings import Settings

log = logging.getLogger(__name__)

# Event ids are derived, not random: a listener that emits a study's generation again (it
# restarted before it recorded the first emit) sends the same id, and the server's trigger
# evaluation ignores an id it has seen, so the flow does not run twice for it.
_EVENT_IDS = uuid.UUID("6f1d0a52-3c3e-5b8e-9a57-7061637366c6")


def stable_event_id(study_ref: str, generation: int) -> uuid.UUID:
    return uuid.uuid5(_EVENT_IDS, f"{study_resource_id(study_ref)}/{check_generation(generation)}")


def emit_study_stable(study_ref: str, generation: int, objects: int, modalities: Iterable[str]) -> None:
    """Tell Prefect that generation ``generation`` of the study (``objects`` new objects of these
    modalities) is handed off for ingest. Events go out from a background worker of Prefect's:
    a process that ends right after this call should call
    ``prefect.events.worker.EventsWorker.drain_all()`` first."""
    resource = {"prefect.resource.id": study_resource_id(study_ref), GENERATION_LABEL: str(generation)}
    payload = {"objects": int(objects), "modalities": sorted({str(m) for m in modalities if m})}
    emit_event(STABLE_EVENT, resource=resource, payload=payload, id=stable_event_id(study_ref, generation))


ROUTED_EVENT = "pacsflow.study.routed"


def emit_study_routed(study_ref: str, generation: int, objects: int, queued: Mapping[str, int],
                      ingest: bool) -> None:
    """Tell Prefect that the listener routed generation ``generation`` of the study: ``objects``
    objects, ``queued`` of them per destination name, handed to the lake or not."""
    resource = {"prefect.resource.id": study_resource_id(study_ref), GENERATION_LABEL: str(generation)}
    payload = {"objects": int(objects), "queued": {str(k): int(v) for k, v in sorted(queued.items())},
               "ingest": bool(ingest)}
    emit_event(ROUTED_EVENT, resource=resource, payload=payload,
               id=uuid.uuid5(_EVENT_IDS, f"routed/{study_resource_id(study_ref)}/{check_generation(generation)}"))


def announce_waiting(settings: Settings) -> int:
    """At the start of ``pacsflow listen`` or ``pacsflow serve``: hand-off folders still there were
    not ingested yet (the flow removes its folder), perhaps because the process died before its
    event went out. Announce them again; the event id is the same, so a server that saw the event
    already does nothing, and a run whose folder is gone ends Skipped."""
    root = handoff_root(settings)
    count = 0
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        ref, _, generation = folder.name.rpartition("-")
        try:
            emit_study_stable(ref, int(generation), sum(1 for _ in folder.glob("*.dcm")), [])
        except ValueError:
            log.warning("hand-off folder %r is not named <study ref>-<generation>; left alone", folder.name)
            continue
        count += 1
    if count:
        log.info("announced %d hand-off folder(s) again that were waiting for the ingest-study flow", count)
    return count
