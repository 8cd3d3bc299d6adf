"""Settings from the environment: one code path serves GBIF for users and the emulator in tests."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_API_URL = "https://api.gbif.org/v1"
_TRUE = {"1", "true", "yes", "on"}


def env_flag(name: str) -> bool:
    """Read a boolean switch the way shell users write it (1/true/yes/on)."""
    return os.environ.get(name, "").strip().lower() in _TRUE


class SettingsError(ValueError):
    """An environment variable with a value we cannot use; the message names it."""


def fetch_processes_from_env() -> int:
    """GBIF_ASSETS_FETCH_PROCESSES: event loops the image fetch may use, one per process (default:
    one per core, at most 4); a large partition is split between them by host."""
    raw = os.environ.get("GBIF_ASSETS_FETCH_PROCESSES", "").strip()
    if not raw:
        return max(1, min(os.cpu_count() or 1, 4))
    if not raw.isdigit() or int(raw) < 1:
        raise SettingsError(f"GBIF_ASSETS_FETCH_PROCESSES must be a whole number of processes, 1 or more (got {raw!r})")
    return int(raw)


def api_url_from_env() -> str:
    """GBIF_API_URL, checked before anything runs: an http(s) URL with a host and a valid port."""
    raw = os.environ.get("GBIF_API_URL", DEFAULT_API_URL).strip().rstrip("/")
    try:
        parts = urlsplit(raw)
        port = parts.port  # raises on a port outside 0-65535 or not a number
    except ValueError as exc:
        raise SettingsError(f"GBIF_API_URL {raw!r} is not a usable URL ({exc}); e.g. {DEFAULT_API_URL}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise SettingsError(f"GBIF_API_URL {raw!r} must be an http(s) URL with a host, e.g. {DEFAULT_API_URL}")
    return raw


def duckdb_memory_from_env() -> str:
    """GBIF_ASSETS_DUCKDB_MEMORY: DuckDB's memory budget for the warehouse steps (default 1500MB)."""
    raw = os.environ.get("GBIF_ASSETS_DUCKDB_MEMORY", "").strip() or "1500MB"
    if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", raw, re.IGNORECASE):
        raise SettingsError(f"GBIF_ASSETS_DUCKDB_MEMORY must be a size such as 1500MB or 4GB (got {raw!r})")
    return raw


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
    fetch_processes: int = field(default_factory=fetch_processes_from_env)

    @classmethod
    def from_env(cls) -> Settings:
        """Resolve settings now; paths are made absolute so a later chdir cannot move outputs."""
        duckdb_memory_from_env()  # checked now, not in the middle of a build
        home = Path(os.environ.get("GBIF_ASSETS_HOME", "data")).resolve()
        for folder in (home, *home.parents):
            if folder.exists() and not folder.is_dir():
                raise SettingsError(f"GBIF_ASSETS_HOME (--home) {home}: {folder} is a file, not a folder")
        return cls(
            api_url=api_url_from_env(),
            username=os.environ.get("GBIF_USERNAME") or None,
            password=os.environ.get("GBIF_PASSWORD") or None,
            email=os.environ.get("GBIF_EMAIL") or None,
            home=home,
            datasets_dir=Path(os.environ.get("GBIF_ASSETS_DATASETS", "datasets")).resolve(),
            allow_private_hosts=env_flag("GBIF_ASSETS_ALLOW_PRIVATE_HOSTS"),
            fetch_processes=fetch_processes_from_env(),
        )

    def dataset_home(self, name: str) -> Path:
        """Where one dataset's archive, warehouse, images and reports live."""
        return self.home / name

    def __repr__(self) -> str:  # never print the password
        return (
            f"Settings(api_url={self.api_url!r}, username={self.username!r}, "
            f"password={'***' if self.password else None}, home={str(self.home)!r}, "
            f"datasets_dir={str(self.datasets_dir)!r}, "
            f"allow_private_hosts={self.allow_private_hosts}, fetch_processes={self.fetch_processes})"
        )
