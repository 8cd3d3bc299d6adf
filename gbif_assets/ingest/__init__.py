"""GBIF downloads and search records into the DuckDB `occurrences` table."""

from gbif_assets.ingest.dwca import load_archive
from gbif_assets.ingest.result import ArchiveError, IngestResult
from gbif_assets.ingest.schema import OCCURRENCE_COLUMNS, required_fields
from gbif_assets.ingest.search import load_search_records

__all__ = [
    "OCCURRENCE_COLUMNS",
    "ArchiveError",
    "IngestResult",
    "load_archive",
    "load_search_records",
    "required_fields",
]
