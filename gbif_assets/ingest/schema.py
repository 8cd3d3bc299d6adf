"""The `occurrences` table: one row per media item joined with the occurrence fields we need."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

MEDIA_COLUMNS = [
    "type", "format", "identifier", "references", "title", "description", "source", "audience",
    "created", "creator", "contributor", "publisher", "license", "rightsHolder",
]  # fmt: skip
OCCURRENCE_FIELDS = [
    "datasetKey", "publishingOrgKey", "basisOfRecord", "kingdomKey", "phylumKey", "classKey",
    "orderKey", "familyKey", "genusKey", "speciesKey", "taxonKey", "acceptedTaxonKey",
    "scientificName", "species", "countryCode", "eventDate", "decimalLatitude", "decimalLongitude",
]  # fmt: skip
DOUBLE_FIELDS = {"decimalLatitude", "decimalLongitude"}

OCCURRENCE_COLUMNS: list[tuple[str, str]] = [
    ("gbifID", "VARCHAR"),
    ("media_index", "INTEGER"),
    *[(name, "VARCHAR") for name in MEDIA_COLUMNS],
    ("occurrence_license", "VARCHAR"),
    *[(name, "DOUBLE" if name in DOUBLE_FIELDS else "VARCHAR") for name in OCCURRENCE_FIELDS],
]


def required_fields(recipe: Any) -> list[str]:
    """Occurrence fields beyond the fixed set that the recipe's label and streams need."""
    fixed = {name for name, _ in OCCURRENCE_COLUMNS} | {"license"}
    extra = [recipe.label, *recipe.balance.split_streams_by]
    out: list[str] = []
    for name in extra:
        if name not in fixed and name not in out:
            out.append(name)
    return out


def literal(value: str | PurePath) -> str:
    """A DuckDB string literal: a path or a value with an apostrophe in it stays one literal."""
    text = value.as_posix() if isinstance(value, PurePath) else value
    return "'" + text.replace("'", "''") + "'"


def quote(name: str) -> str:
    """A DuckDB identifier, always quoted ("references", "type" and "order" are keywords)."""
    return '"' + name.replace('"', '""') + '"'
