"""``pacsflow token add | list | revoke``: the bearer tokens of ``pacsflow serve``."""

from __future__ import annotations

from typing import Annotated, Any, Callable, NoReturn

import typer
from rich.console import Console

from pacsflow.tasks.web.tokens import Scope, TokenError, TokenStore

out = Console()
err = Console(stderr=True)


def build_app(settings: Callable[[], Any]) -> typer.Typer:
    app = typer.Typer(name="token", help="Bearer tokens of pacsflow serve (stored hashed).", no_args_is_help=True)

    def store() -> TokenStore:
        return TokenStore(settings().tokens_path)

    @app.command("add")
    def add(name: Annotated[str, typer.Argument(help="who or what uses it (shown in the access log)")],
            scope: Annotated[list[Scope], typer.Option("--scope", help="read (QIDO, WADO, API, dashboard) and/or "
                                                       "write (STOW)")] = [Scope.READ]) -> None:  # noqa: B006
        """Make a token and print it once: only its hash is kept."""
        try:
            token = store().add(name, set(scope))
        except TokenError as exc:
            _fail(exc)
        out.print(token, markup=False, highlight=False)

    @app.command("list")
    def list_tokens() -> None:
        """Token names and scopes."""
        for name, scopes in store().names().items():
            out.print(f"{name}\t{','.join(scopes)}", markup=False, highlight=False)

    @app.command("revoke")
    def revoke(name: str) -> None:
        """Delete a token: requests with it are refused from now on."""
        if not store().revoke(name):
            _fail(TokenError(f"no token named {name!r}"))
        out.print(f"revoked {name}")

    return app


def _fail(exc: Exception) -> NoReturn:
    err.print(f"pacsflow: error: {type(exc).__name__}: {exc}", markup=False)
    raise typer.Exit(2)
