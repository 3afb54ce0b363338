"""``pacsflow deidentify``: a folder through the de-identifier, with a progress bar and a summary.

No Prefect here: the root command line passes in how to read settings and how to load a Secret
block, so a key kept in a Prefect block works without this module knowing about Prefect.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress

if TYPE_CHECKING:
    from pacsflow.tasks.deid.folder import DeidRunSummary
    from pacsflow.tasks.settings import Settings

console = Console(stderr=True)
out = Console()

MIN_KEY_LENGTH = 16


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]{message}[/red]")
    return typer.Exit(2)


def read_key(settings: Settings, key_file: Path | None, load_secret: Callable[[str], Any]) -> bytes:
    """The key from ``key_file``, else from the settings (a Secret block is loaded only then).

    Any problem ends the command with exit status 2 and a message that does not show the key."""
    from pacsflow.tasks.settings import SettingsError

    try:
        if key_file is not None:
            key = key_file.read_text(encoding="utf-8").strip().encode()
        else:
            key = settings.with_secret_blocks(load_secret).resolve_deid_key()
    except OSError as exc:
        raise _fail(f"--key-file: cannot read it ({type(exc).__name__})") from None
    except SettingsError as exc:
        raise _fail(str(exc)) from None
    if len(key) < MIN_KEY_LENGTH:
        raise _fail(f"the key must be at least {MIN_KEY_LENGTH} characters")
    return key


def deidentify_folder(settings: Settings, key: bytes, in_dir: Path, out_dir: Path, *,
                      options: list[str] | None = None, pixel_policy: str | None = None,
                      quarantine_dir: Path | None = None, crosswalk: Path | None = None,
                      recipe: Path | None = None) -> DeidRunSummary:
    """``run_deidentify`` with the settings' profile where no value is given, behind a progress bar."""
    from pacsflow.tasks.core.errors import DeidentificationError
    from pacsflow.tasks.deid.crosswalk import open_crosswalk
    from pacsflow.tasks.deid.folder import run_deidentify
    from pacsflow.tasks.deid.recipe import load_recipe
    from pacsflow.tasks.deid.ocr import OcrConfig

    try:
        recipe_file = recipe or settings.deid.recipe_file
        site = load_recipe(recipe_file, settings.deid.recipe_may_keep) if recipe_file else None
        with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), console=console) as bar:
            task = bar.add_task("de-identifying", total=None)
            return run_deidentify(
                in_dir, out_dir, options or settings.deid.options, key,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                pixel_policy=pixel_policy or settings.deid.pixel_policy,
                pixel_masks=settings.deid.pixel_masks, pixel_ocr=OcrConfig.from_settings(settings.deid),
                audit=settings.deid.audit,
                quarantine_dir=quarantine_dir, crosswalk_path=crosswalk or open_crosswalk(settings),
                recipe=site,
            )
    except (ValueError, DeidentificationError) as exc:  # our messages carry no PHI
        raise _fail(str(exc)) from None


def build_app(settings: Callable[[], Settings], load_secret: Callable[[str], Any]) -> typer.Typer:
    """A Typer holding the one ``deidentify`` command (mount it without a name)."""
    app = typer.Typer(pretty_exceptions_show_locals=False)  # locals hold the key

    @app.command("deidentify")
    def deidentify(
        in_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="folder of DICOM files (recursive)")],
        out_dir: Annotated[Path, typer.Argument(help="de-identified files and deid-manifest.json")],
        option: Annotated[
            Optional[list[str]], typer.Option("--option", "-o", help="Table E.1-1 option (repeat); default: settings")
        ] = None,
        key_file: Annotated[Optional[Path], typer.Option(help="file holding the key; default: the settings' key")]
        = None,
        quarantine_dir: Annotated[
            Optional[Path], typer.Option(help="where objects that must not leave go (PHI; outside OUT_DIR)")
        ] = None,
        crosswalk: Annotated[
            Optional[Path], typer.Option(help="pseudonym <-> original CSV (PHI, 0600, outside OUT_DIR)")
        ] = None,
        pixel_policy: Annotated[Optional[str], typer.Option(help="ocr | quarantine | mask | allow; default: settings")]
        = None,
        recipe: Annotated[
            Optional[Path], typer.Option(help="a site's deid recipe applied on top of the profile; default: "
                                              "settings (deid.recipe_file)")
        ] = None,
    ) -> None:
        """De-identify a folder with the configured profile, quarantine what must not leave, print a summary.

        The same key gives byte-identical outputs on every run."""
        current = settings()
        key = read_key(current, key_file, load_secret)
        summary = deidentify_folder(current, key, in_dir, out_dir, options=option, pixel_policy=pixel_policy,
                                    quarantine_dir=quarantine_dir, crosswalk=crosswalk, recipe=recipe)
        for line in summary.lines():
            out.print(line)

    return app
