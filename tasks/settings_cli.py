"""``pacsflow init``: a commented settings file and a random de-identification key to start from.

Both files are owner-only (0600; folders it creates 0700) and written whole or not at all. An
existing file is left alone unless ``--force``: a new key gives every patient and study new
pseudonyms, so replacing one by accident would split the lake in two.
"""

from __future__ import annotations

import secrets
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console(stderr=True)

DEFAULT_CONFIG = Path("var/pacsflow.yaml")
KEY_FILE_NAME = "deid.key"
KEY_BYTES = 32  # 256 bits; 43 characters in URL-safe base64

HEADER = """\
pacsflow settings, written by `pacsflow init`: every setting with its default.
Use it:  export PACSFLOW_CONFIG={config}
PACSFLOW_* environment variables override this file (nested names joined by __, e.g. PACSFLOW_PACS__PORT).
Relative paths are relative to the folder the command or the Prefect worker runs in.
Secrets (deid_key, fhir.token, fhir.password) are never written here: the key is in deid_key_file,
owner-only; keep a copy somewhere safe, since without it no pseudonym can be recomputed.
"""


def write_starter_files(config: Path, key_file: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write a commented settings file naming ``key_file``, and a random key in ``key_file``;
    both owner-only. Returns their absolute paths. Refuses existing files unless ``force``."""
    # pydantic and the settings model load when the command runs, so `pacsflow --help` stays quick
    from pacsflow.tasks.core.files import describe_os_error, write_atomic
    from pacsflow.tasks.settings import SettingsError
    from pacsflow.tasks.settings_reference import commented_config

    config, key_file = config.absolute(), key_file.absolute()
    if config == key_file:
        raise SettingsError(f"init: the settings file and the key file are the same path ({config})")
    existing = [str(p) for p in (config, key_file) if p.exists()]
    if existing and not force:
        raise SettingsError(f"init: {', '.join(existing)}: already there; pass --force to overwrite")
    text = commented_config({"deid_key_file": str(key_file)}, header=HEADER.format(config=shlex.quote(str(config))))
    try:
        write_atomic(key_file, secrets.token_urlsafe(KEY_BYTES).encode("ascii") + b"\n", private=True)
        write_atomic(config, text.encode("utf-8"), private=True)
    except OSError as exc:
        raise SettingsError(f"init: cannot write {exc.filename or config} ({describe_os_error(exc)})") from None
    return config, key_file


def build_app() -> typer.Typer:
    """A Typer holding the one ``init`` command (mount it without a name)."""
    app = typer.Typer()

    @app.command("init")
    def init(
        path: Annotated[Path, typer.Argument(help="the settings file to write")] = DEFAULT_CONFIG,
        key_file: Annotated[
            Optional[Path], typer.Option(help=f"the key file to write (default: {KEY_FILE_NAME} beside PATH)")
        ] = None,
        force: Annotated[bool, typer.Option(help="overwrite existing files (a new key means new pseudonyms)")]
        = False,
    ) -> None:
        """Write a commented settings file and a random de-identification key (owner-only).

        The file holds every setting with its default and meaning, and names the key file; the
        command prints the `export PACSFLOW_CONFIG=...` line that puts it to use."""
        key_path = key_file if key_file is not None else path.parent / KEY_FILE_NAME
        replaced_key = key_path.exists()
        config, key = write_starter_files(path, key_path, force=force)
        console.print(f"wrote {config} (settings, owner-only)")
        console.print(f"wrote {key} (a random de-identification key, owner-only: keep a copy somewhere safe)")
        if replaced_key:
            console.print("[yellow]the old key was replaced: pseudonyms made with it will not match new ones"
                          "[/yellow]")
        typer.echo(f"export PACSFLOW_CONFIG={shlex.quote(str(config))}")

    return app
