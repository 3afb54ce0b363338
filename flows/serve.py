"""``pacsflow serve``: the HTTP service (:func:`pacsflow.tasks.web.app.create_app`) under uvicorn,
with HTTPS when ``serve.tls_cert`` is set. Runs until SIGTERM or Ctrl-C.

STOW-RS hands what it receives to the ``ingest-study`` deployment through the Prefect event
``pacsflow.study.stable``, as the listener does; that needs ``PREFECT_API_URL`` (the server where
the deployment and its trigger live) and the de-identification key (the answer names the lake's
UIDs). Without either, the rest of the service runs and STOW-RS answers 503 saying which is missing.
"""

from __future__ import annotations

import logging

import uvicorn
from fastapi import FastAPI
from prefect.events.worker import EventsWorker
from prefect.settings import PREFECT_API_URL

from pacsflow.flows.console import configure_console_logging
from pacsflow.flows.events import announce_waiting, emit_study_stable
from pacsflow.flows.secrets import load_secret_block
from pacsflow.tasks.deid.deidentifier import Deidentifier
from pacsflow.tasks.settings import Settings, SettingsError, load_settings
from pacsflow.tasks.web.app import create_app
from pacsflow.tasks.web.stow import StowIngest, enable_stow
from pacsflow.tasks.web.xdsi import close_audit_log

log = logging.getLogger("pacsflow.serve")


def build_app(settings: Settings) -> FastAPI:
    """The application with everything wired that needs the flows layer (STOW-RS's hand-off, the
    FHIR credentials a Secret block holds)."""
    app = create_app(with_fhir_credentials(settings))
    ingest, reason = stow_ingest(settings)
    enable_stow(app, ingest, reason)
    if ingest is None:
        log.warning("STOW-RS is off: %s", reason)
    else:
        announce_waiting(settings)  # hand-offs a crashed serve (or listener) left without their event
    return app


def with_fhir_credentials(settings: Settings) -> Settings:
    """``settings`` with the FHIR credentials ``fhir.credentials_block`` names (the study API's
    ``check=fhir`` reads the server with them). Only those: serving reads nothing else the blocks
    hold. Without them the service runs and the check answers with the reason."""
    if not settings.fhir.credentials_block:
        return settings
    if not PREFECT_API_URL.value():
        log.warning("fhir.credentials_block needs PREFECT_API_URL (the server holding the block): the study "
                    "API's FHIR check goes without credentials")
        return settings
    try:
        loaded = settings.model_copy(update={"deid_key_block": None}).with_secret_blocks(load_secret_block)
    except SettingsError as exc:
        log.warning("the study API's FHIR check goes without credentials: %s", exc)
        return settings
    return settings.model_copy(update={"fhir": loaded.fhir})


def stow_ingest(settings: Settings) -> tuple[StowIngest | None, str]:
    """STOW-RS's way into the ingest path, or None and the one-line reason it cannot have one."""
    if not PREFECT_API_URL.value():
        # Without a server the event would start a temporary one that no deployment listens to.
        return None, ("STOW-RS needs PREFECT_API_URL: set it to the Prefect server that runs the ingest-study "
                      "deployment, and restart pacsflow serve")
    try:
        key = settings.with_secret_blocks(load_secret_block).resolve_deid_key()
    except SettingsError as exc:
        return None, f"STOW-RS needs the de-identification key: {exc}"
    deid = Deidentifier.from_settings(key, settings.deid)
    return StowIngest(lake_uid=deid.uid, study_ref=deid.study_ref, announce=emit_study_stable), ""


def app_from_environment() -> FastAPI:
    """The app of one worker process (``serve.workers`` > 1): uvicorn starts each worker afresh, so
    it reads the settings from the environment (``PACSFLOW_*``, ``PACSFLOW_CONFIG``) as the command
    did, and logs to the console as the command does."""
    configure_console_logging(logging.INFO)
    return build_app(load_settings())


def serve(settings: Settings) -> None:
    s = settings.serve
    scheme = "https" if s.tls_cert else "http"
    log.info("serving DICOMweb, the study API and the dashboard on %s://%s:%d (%d worker process%s)", scheme,
             s.host, s.port, s.workers, "" if s.workers == 1 else "es")
    app: FastAPI | str = build_app(settings) if s.workers == 1 else f"{__name__}:app_from_environment"
    try:
        # uvicorn's own access log would print query strings; ours (pacsflow.serve.access) does not.
        uvicorn.run(app, factory=s.workers > 1, workers=s.workers, host=s.host, port=s.port, access_log=False,
                    log_config=None, ssl_certfile=str(s.tls_cert) if s.tls_cert else None,
                    ssl_keyfile=str(s.tls_key) if s.tls_key else None)
    finally:
        EventsWorker.drain_all(timeout=10)  # the last STOW requests' events go out before the process ends
        if not isinstance(app, str):
            close_audit_log(app)  # and the last responses' audit messages (one worker process)
