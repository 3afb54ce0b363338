"""The hand-off between ``pacsflow listen`` and the ``ingest-study`` flow (pure: no Prefect, no sockets).

When a pushed study is stable and a rule says ``ingest``, the listener hard-links the study's new
original objects (flat, ``*.dcm``) into :func:`handoff_dir` and emits the event
``pacsflow.study.stable`` for the study resource :func:`study_resource_id`; the flow that event
starts de-identifies that folder and removes it. A study that goes on arriving after it was
stable is handed off again under the next generation, holding only the objects that are new.

The folder lives in the listener's PHI zone; its name holds only the keyed ``2.25.`` pseudonym of
the study (``Deidentifier.study_ref``) and the generation, so it can travel in events, flow
parameters and run names. :func:`check_study_ref` refuses anything else, so neither a path nor an
original UID can get through a parameter that came from an event.
"""

from __future__ import annotations

import re
from pathlib import Path

from pacsflow.tasks.settings import Settings

HANDOFF = "handoff"
STUDY_RESOURCE_PREFIX = "pacsflow.study."
STABLE_EVENT = "pacsflow.study.stable"
GENERATION_LABEL = "pacsflow.generation"
# What Deidentifier.study_ref makes: "2.25." and a 128-bit integer.
_STUDY_REF = re.compile(r"2\.25\.(0|[1-9][0-9]{0,38})")


def check_study_ref(value: str) -> str:
    """The study ref in ``value`` (a bare ref, or the event's resource id); ValueError when it is
    not a keyed pseudonym (the message does not repeat the value: it could be anything)."""
    ref = value.strip().removeprefix(STUDY_RESOURCE_PREFIX)
    if not _STUDY_REF.fullmatch(ref):
        raise ValueError(f"not a pseudonymous study ref (2.25.<digits>, {len(ref)} characters given)")
    return ref


def check_generation(generation: int) -> int:
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
        raise ValueError("generation must be an integer of at least 1")
    return generation


def study_resource_id(study_ref: str) -> str:
    """The Prefect resource id of a study: what the deployment trigger matches on."""
    return STUDY_RESOURCE_PREFIX + check_study_ref(study_ref)


def handoff_root(settings: Settings) -> Path:
    return settings.listener_dir / HANDOFF


def handoff_dir(settings: Settings, study_ref: str, generation: int) -> Path:
    """Where generation ``generation`` of the study waits for the ``ingest-study`` flow."""
    return handoff_root(settings) / f"{check_study_ref(study_ref)}-{check_generation(generation)}"
