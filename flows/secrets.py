"""Settings for a run, with the secrets that Prefect Secret blocks hold filled in.

The only place that reads Prefect blocks: everything below the flows gets plain ``SecretStr`` values.
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.system import Secret

from pacsflow.tasks.settings import Settings, SettingsError, load_settings


def load_secret_block(name: str) -> Any:
    """The value of the Prefect Secret block ``name`` (never logged)."""
    try:
        return Secret.load(name).get()
    except Exception as exc:  # noqa: BLE001 - any failure to load it is a configuration problem
        raise SettingsError(f"cannot load the Prefect Secret block named in settings ({type(exc).__name__}); "
                            "check the block name and the Prefect API") from None


def load_run_settings(**overrides: Any) -> Settings:
    """``load_settings`` plus the secrets named by ``deid_key_block`` and ``fhir.credentials_block``."""
    return load_settings(**overrides).with_secret_blocks(load_secret_block)
