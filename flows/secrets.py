"""Settings for a run, with the secrets that Prefect Secret blocks hold filled in.

The only place that reads Prefect blocks: everything below the flows gets plain ``SecretStr`` values.
A caller that already holds settings (``pacsflow demo``) hands them to the flows it starts with
:func:`run_settings` instead of writing them into the process environment.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, cast

from prefect.blocks.system import Secret

from pacsflow.tasks.settings import Settings, SettingsError, load_settings

# A ContextVar, not a global: Prefect copies the caller's context into the flow run and into every
# task it submits to worker threads, and two runs started from different threads do not see each other's.
_RUN_SETTINGS: ContextVar[Settings | None] = ContextVar("pacsflow_run_settings", default=None)


def load_secret_block(name: str) -> Any:
    """The value of the Prefect Secret block ``name`` (never logged)."""
    try:
        block = cast(Secret, Secret.load(name))  # called from sync code: the block, not a coroutine
        return block.get()
    except Exception as exc:  # noqa: BLE001 - any failure to load it is a configuration problem
        raise SettingsError(f"cannot load the Prefect Secret block named in settings ({type(exc).__name__}); "
                            "check the block name and the Prefect API") from None


@contextmanager
def run_settings(settings: Settings) -> Iterator[Settings]:
    """Flows (and their tasks) started inside the ``with`` block use ``settings`` instead of reading
    ``PACSFLOW_*`` and ``PACSFLOW_CONFIG``; the previous state comes back when the block ends."""
    token = _RUN_SETTINGS.set(settings)
    try:
        yield settings
    finally:
        _RUN_SETTINGS.reset(token)


def load_run_settings(**overrides: Any) -> Settings:
    """The settings for this run plus the secrets named by ``deid_key_block`` and ``fhir.credentials_block``.

    Inside :func:`run_settings` the settings given there (``overrides`` replace their top-level
    fields, validated again); elsewhere ``load_settings(**overrides)``.
    """
    given = _RUN_SETTINGS.get()
    if given is None:
        settings = load_settings(**overrides)
    elif overrides:  # model_validate, unlike Settings(...), reads no environment
        settings = Settings.model_validate({**given.model_dump(), **overrides})
    else:
        settings = given
    return settings.with_secret_blocks(load_secret_block)
