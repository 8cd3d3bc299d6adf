"""The image fetch engine (asyncio + aiohttp) and the per-label partition driver."""

from gbif_assets.fetch.engine import Candidate, FetchConfig, FetchEngine, Outcome, Progress
from gbif_assets.fetch.partition import LabelFetchResult, download_label, label_dir

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
