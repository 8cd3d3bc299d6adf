"""GBIF API: async client, predicates, and search-mode harvesting."""

from gbif_assets.gbif.client import (
    DownloadGone,
    GbifAuthError,
    GbifClient,
    GbifError,
    retry_after_seconds,
)
from gbif_assets.gbif.harvest import HarvestReport, HarvestTooLarge, harvest
from gbif_assets.gbif.predicate import (
    query_to_predicate,
    query_to_search_params,
    validate_predicate,
)

__all__ = [
    "DownloadGone",
    "GbifAuthError",
    "GbifClient",
    "GbifError",
    "HarvestReport",
    "HarvestTooLarge",
    "harvest",
    "query_to_predicate",
    "query_to_search_params",
    "retry_after_seconds",
    "validate_predicate",
]
