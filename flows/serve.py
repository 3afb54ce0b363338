"""``pacsflow serve``: the HTTP service (:func:`pacsflow.tasks.web.app.create_app`) under uvicorn,
with HTTPS when ``serve.tls_cert`` is set. Runs until SIGTERM or Ctrl-C."""

from __future__ import annotations

import logging

import uvicorn
from fastapi import FastAPI

from pacsflow.tasks.settings import Settings
from pacsflow.tasks.web.app import create_app

log = logging.getLogger("pacsflow.serve")


def build_app(settings: Settings) -> FastAPI:
    """The application with everything wired that needs the flows layer (STOW-RS's hand-off)."""
    return create_app(settings)


def serve(settings: Settings) -> None:
    s = settings.serve
    scheme = "https" if s.tls_cert else "http"
    log.info("serving DICOMweb, the study API and the dashboard on %s://%s:%d", scheme, s.host, s.port)
    # uvicorn's own access log would print query strings; ours (pacsflow.serve.access) does not.
    uvicorn.run(build_app(settings), host=s.host, port=s.port, access_log=False, log_config=None,
                ssl_certfile=str(s.tls_cert) if s.tls_cert else None,
                ssl_keyfile=str(s.tls_key) if s.tls_key else None)
