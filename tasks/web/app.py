"""The HTTP application of ``pacsflow serve`` (FastAPI): authentication, the access log, CORS, and
the routers of each part (``dicom-web`` QIDO/WADO/STOW, ``api``, ``dashboard``).

Every route except ``/health`` needs a bearer token (:mod:`.tokens`) with the route's scope. The
access log names the method, the route's template (never the request's query string), the status,
the time taken and the token's name; the UIDs in a DICOMweb path are the lake's pseudonyms, but the
template keeps even those out of the log.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Annotated, Awaitable, Callable

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pacsflow.tasks.settings import Settings
from pacsflow.tasks.web.tokens import Principal, Scope, TokenStore

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


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="pacsflow", summary="DICOMweb over the de-identified lake, the study API and the dashboard",
                  version="1")
    app.state.ctx = ServeContext(settings, TokenStore(settings.tokens_path))
    if settings.serve.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.serve.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Accept", "Content-Type"], max_age=600)
    app.middleware("http")(_log_access)

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    # The routers import this module's auth dependencies, hence imported here.
    from pacsflow.tasks.web import dashboard, qido, stow, studies, wado

    app.include_router(qido.router, prefix="/dicom-web")
    app.include_router(wado.router, prefix="/dicom-web")
    app.include_router(stow.router, prefix="/dicom-web")
    app.include_router(studies.router)
    app.include_router(dashboard.router)
    app.include_router(wado.guard, prefix="/dicom-web")  # keep last: it answers GETs no other route took
    return app


async def _log_access(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    start = time.perf_counter()
    response = await call_next(request)
    route = request.scope.get("route")
    template = getattr(route, "path", "(no route)")
    access_log.info("%s %s %d %.1f ms %s", request.method, template, response.status_code,
                    (time.perf_counter() - start) * 1000, getattr(request.state, "principal", "-"))
    return response
