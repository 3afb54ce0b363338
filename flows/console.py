"""What the ``pacsflow`` command line shows when something fails: one line, tracebacks only under ``--debug``.

A failed command ends with ``pacsflow: error: <ErrorType>: <message>`` on stderr and exit status 2
when a setting is wrong (a value, an AE title, a URL, a path) or 1 for anything else (a peer that
does not answer, a full disk). Messages come from our typed errors, which carry setting names,
peers, paths and counts, never header values or key material; any other exception is named by its
type alone.

Log records keep their one-line message on the console and lose their traceback there: the
console handler formats a copy, so Prefect's own handlers of the run loggers (the API, i.e. the
run's logs in the UI) still get the full traceback that operators need.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import typer
from rich.console import Console

from pacsflow.catalog.errors import CatalogNotFound
from pacsflow.tasks.core.errors import FhirConfigurationError, PacsConfigurationError, XdsConfigurationError, error_text

PREFIX = "pacsflow: error: "
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

stderr = Console(stderr=True, highlight=False, soft_wrap=True)
_debug = [False]  # set once per command line, by the root command's --debug


def debugging() -> bool:
    return _debug[0]


def exit_status(exc: BaseException) -> int:
    """2 for a configuration problem (fixing it needs a change of settings, or of the peer's
    configuration, not another try), 1 for a failure at run time."""
    from pacsflow.tasks.route.rules import RulesError
    from pacsflow.tasks.settings import SettingsError  # pydantic: only once something failed

    configuration = (SettingsError, PacsConfigurationError, FhirConfigurationError, XdsConfigurationError, CatalogNotFound,
                     RulesError)
    return 2 if isinstance(exc, configuration) else 1


def error_line(exc: BaseException) -> str:
    """The one line a failed command prints (settings errors name the setting, never its value)."""
    from pacsflow.tasks.settings import SettingsError

    if isinstance(exc, SettingsError):
        return f"{PREFIX}SettingsError: {exc}"
    text = error_text(exc)
    if text == type(exc).__name__:  # not one of ours: its message may hold anything
        text += " (unexpected; run with --debug for the traceback)"
    return f"{PREFIX}{text}"


def fail(exc: BaseException) -> NoReturn:
    """End the command with the error's one line and exit status (under ``--debug``: raise it)."""
    if debugging():
        raise exc
    report(exc)
    raise typer.Exit(exit_status(exc))


def report(exc: BaseException) -> None:
    stderr.print(error_line(exc), markup=False)


def report_text(text: str) -> None:
    """A failure that is no exception (e.g. a run that ended with failed studies), as one line."""
    stderr.print(f"{PREFIX}{text}", markup=False)


class ConsoleFormatter(logging.Formatter):
    """The console's log format; without ``tracebacks`` a record's exception shows as its message only."""

    def __init__(self, fmt: str = LOG_FORMAT, *, tracebacks: bool = False) -> None:
        super().__init__(fmt)
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        if self.tracebacks or not (record.exc_info or record.exc_text or record.stack_info):
            return super().format(record)
        brief = logging.makeLogRecord(record.__dict__)  # the record itself stays whole for other handlers
        brief.exc_info, brief.exc_text, brief.stack_info = None, None, None
        return super().format(brief)


def configure_console_logging(level: int = logging.INFO) -> None:
    """Our handler on the root logger: Prefect keeps a root handler it did not install (its own
    console handler is then left out), and its run loggers propagate to it."""
    handler = logging.StreamHandler()
    handler.setFormatter(ConsoleFormatter())
    logging.basicConfig(level=level, handlers=[handler])


def show_tracebacks(on: bool) -> None:
    """``--debug``: errors end commands with their traceback, and log records keep theirs."""
    _debug[0] = on
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, ConsoleFormatter):
            handler.formatter.tracebacks = on
