"""The image fetch engine (asyncio + aiohttp) and the per-label partition driver.

Names are imported on first use (PEP 562), so a fetch shard process loads the engine alone,
not DuckDB and pyarrow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gbif_assets.fetch.engine import Candidate, FetchConfig, FetchEngine, Outcome, Progress
    from gbif_assets.fetch.partition import LabelFetchResult, download_label, label_dir

_HOMES = {
    "Candidate": "engine",
    "FetchConfig": "engine",
    "FetchEngine": "engine",
    "Outcome": "engine",
    "Progress": "engine",
    "LabelFetchResult": "partition",
    "download_label": "partition",
    "label_dir": "partition",
}
__all__ = [
    "Candidate",
    "FetchConfig",
    "FetchEngine",
    "LabelFetchResult",
    "Outcome",
    "Progress",
    "download_label",
    "label_dir",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
