"""Settings from the environment: one code path serves GBIF for users and the emulator in tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_API_URL = "https://api.gbif.org/v1"
_TRUE = {"1", "true", "yes", "on"}


def env_flag(name: str) -> bool:
    """Read a boolean switch the way shell users write it (1/true/yes/on)."""
    return os.environ.get(name, "").strip().lower() in _TRUE


@dataclass(frozen=True)
class Settings:
    """Everything configurable by environment (DESIGN.md, "Configuration")."""

    api_url: str
    username: str | None
    password: str | None
    email: str | None
    home: Path
    datasets_dir: Path
    allow_private_hosts: bool

    @classmethod
    def from_env(cls) -> Settings:
        """Resolve settings now; paths are made absolute so a later chdir cannot move outputs."""
        return cls(
            api_url=os.environ.get("GBIF_API_URL", DEFAULT_API_URL).rstrip("/"),
            username=os.environ.get("GBIF_USERNAME") or None,
            password=os.environ.get("GBIF_PASSWORD") or None,
            email=os.environ.get("GBIF_EMAIL") or None,
            home=Path(os.environ.get("GBIF_ASSETS_HOME", "data")).resolve(),
            datasets_dir=Path(os.environ.get("GBIF_ASSETS_DATASETS", "datasets")).resolve(),
            allow_private_hosts=env_flag("GBIF_ASSETS_ALLOW_PRIVATE_HOSTS"),
        )

    def dataset_home(self, name: str) -> Path:
        """Where one dataset's archive, warehouse, images and reports live."""
        return self.home / name

    def __repr__(self) -> str:  # never print the password
        return (
            f"Settings(api_url={self.api_url!r}, username={self.username!r}, "
            f"password={'***' if self.password else None}, home={str(self.home)!r}, "
            f"datasets_dir={str(self.datasets_dir)!r}, "
            f"allow_private_hosts={self.allow_private_hosts})"
        )
