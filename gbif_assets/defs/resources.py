"""Dagster resources: GBIF credentials and the dataset home, configured from the environment.

Secrets come in through `dg.EnvVar`, so the UI shows the variable name and never its value.
"""

import os
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from gbif_assets.settings import DEFAULT_API_URL, Settings, env_flag


class GbifApiResource(dg.ConfigurableResource):
    """Where the GBIF API is and who we are there (download mode and derived datasets)."""

    api_url: str = DEFAULT_API_URL
    username: str | None = None
    password: str | None = None
    email: str | None = None


class StorageResource(dg.ConfigurableResource):
    """Root of all dataset folders and the private-address switch for image hosts."""

    home: str = "data"
    allow_private_hosts: bool = False

    def dataset_home(self, name: str) -> Path:
        """`$GBIF_ASSETS_HOME/<name>`, absolute so runs in other working dirs agree."""
        return Path(self.home).resolve() / name


class ProgressSink:
    """Where long steps report progress; the CLI swaps in a progress bar, Dagster logs it."""

    def __init__(self, callback: Callable[[str, dict], None] | None = None) -> None:
        self._callback = callback

    def update(self, stage: str, figures: dict) -> None:
        """Forward a progress snapshot (`done`, `target`, `rate`, ...) if anyone listens."""
        if self._callback is not None:
            self._callback(stage, figures)


def _env_or(name: str, default: str | None) -> str | dg.EnvVar | None:
    """An EnvVar when the variable is set (secret stays out of the UI), else the default."""
    return dg.EnvVar(name) if os.environ.get(name) else default


def default_resources(progress: ProgressSink | None = None) -> dict[str, object]:
    """The resources every definition uses, read from the environment at load time."""
    return {
        "gbif": GbifApiResource(
            api_url=_env_or("GBIF_API_URL", DEFAULT_API_URL),
            username=_env_or("GBIF_USERNAME", None),
            password=_env_or("GBIF_PASSWORD", None),
            email=_env_or("GBIF_EMAIL", None),
        ),
        "storage": StorageResource(
            home=_env_or("GBIF_ASSETS_HOME", "data"),
            allow_private_hosts=env_flag("GBIF_ASSETS_ALLOW_PRIVATE_HOSTS"),
        ),
        "progress": dg.ResourceDefinition.hardcoded_resource(progress or ProgressSink()),
    }


def settings_from(gbif: GbifApiResource, storage: StorageResource) -> Settings:
    """Domain code takes plain Settings; this is the one place resources become them."""
    return Settings(
        api_url=gbif.api_url.rstrip("/"),
        username=gbif.username,
        password=gbif.password,
        email=gbif.email,
        home=Path(storage.home).resolve(),
        datasets_dir=Path(os.environ.get("GBIF_ASSETS_DATASETS", "datasets")).resolve(),
        allow_private_hosts=storage.allow_private_hosts,
    )
