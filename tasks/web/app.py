"""The HTTP application of ``pacsflow serve`` (FastAPI): authentication, the access log, CORS, and
the routers of each part (``dicom-web`` QIDO/WADO/STOW, ``api``, ``dashboard``, ``xdsi`` RAD-69).

Every route except ``/health`` needs a bearer token (:mod:`.tokens`) with the route's scope. The
access log names the method, the route's template (never the request's query string), the status,
the time taken and the token's name; the UIDs in a DICOMweb path are the lake's pseudonyms, but the
template keeps even those out of the log.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Annotated, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette import types as asgi

from pacsflow.tasks.settings import Settings
from pacsflow.tasks.web.tokens import Principal, Scope, TokenStore
from pacsflow.tasks.web.zerocopy import ZeroCopyApp

access_log = logging.getLogger("pacsflow.serve.access")

_bearer = HTTPBearer(auto_error=False)


@dataclass
class ServeContext:
    """What the routers need, on ``app.state.ctx``: the settings and the token store."""

    settings: Settings
    tokens: TokenStore


def context(request: Request) -> ServeContext:
    ctx: ServeContext = request.app.state.ctx
    return ctx


def require(scope: Scope) -> Callable[..., Principal]:
    """A dependency: the request's principal, which must hold ``scope`` (401 without a valid
    token, 403 with one that lacks the scope)."""

    def check(request: Request,
              credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
        principal = context(request).tokens.check(credentials.credentials) if credentials else None
        if principal is None:
            raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        request.state.principal = principal.name
        if not principal.may(scope):
            raise HTTPException(403, f"this token lacks the {scope.value} scope")
        return principal

    return check


Reader = Annotated[Principal, Depends(require(Scope.READ))]
Writer = Annotated[Principal, Depends(require(Scope.WRITE))]


class PacsflowApp(FastAPI):
    """The FastAPI app, offering zero-copy file bodies where the server's connection allows them
    (:mod:`.zerocopy`): WADO-RS's files then go from the page cache to the socket."""

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        await ZeroCopyApp(super().__call__)(scope, receive, send)


def create_app(settings: Settings) -> FastAPI:
    app = PacsflowApp(title="pacsflow", summary="DICOMweb over the de-identified lake, the study API and the dashboard",
                  version="1")
    app.state.ctx = ServeContext(settings, TokenStore(settings.tokens_path))
    if settings.serve.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.serve.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Accept", "Content-Type"], max_age=600)
    app.add_middleware(AccessLog)

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    # The routers import this module's auth dependencies, hence imported here.
    from pacsflow.tasks.web import dashboard, qido, stow, studies, wado, xdsi

    app.include_router(qido.router, prefix="/dicom-web")
    app.include_router(wado.router, prefix="/dicom-web")
    app.include_router(stow.router, prefix="/dicom-web")
    app.include_router(studies.router)
    app.include_router(dashboard.router)
    app.include_router(xdsi.router)
    app.include_router(wado.guard, prefix="/dicom-web")  # keep last: it answers GETs no other route took
    return app


class AccessLog:
    """The access log, as plain ASGI middleware. ``app.middleware("http")`` (BaseHTTPMiddleware)
    would relay every piece of a streamed body through a memory channel and another task: a
    WADO-RS retrieval sends one per file. The time logged runs to the body's last byte."""

    def __init__(self, app: asgi.ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def sending(message: asgi.Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # The router records the matched route, and the auth dependency the token's name, in
            # this same scope.
            template = getattr(scope.get("route"), "path", "(no route)")
            access_log.info("%s %s %d %.1f ms %s", scope["method"], template, status,
                            (time.perf_counter() - start) * 1000, scope.get("state", {}).get("principal", "-"))
