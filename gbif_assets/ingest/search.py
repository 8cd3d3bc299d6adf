"""Occurrence-search JSON records into the `occurrences` table, in one transaction."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import duckdb
import pyarrow as pa

from gbif_assets.ingest.result import IngestResult
from gbif_assets.ingest.schema import DOUBLE_FIELDS, MEDIA_COLUMNS, OCCURRENCE_COLUMNS, quote
from gbif_assets.ingest.tables import replace_table


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, list):
        return ";".join(str(v) for v in value) or None
    return str(value)


def _number(value: Any) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def load_search_records(
    con: duckdb.DuckDBPyConnection,
    records: Iterable[dict[str, Any]],
    fields: list[str],
    table: str = "occurrences",
) -> IngestResult:
    """One row per media item of each record; records without media are counted, not loaded."""
    started = time.monotonic()
    names = [name for name, _ in OCCURRENCE_COLUMNS] + [f for f in fields if f not in dict(OCCURRENCE_COLUMNS)]
    columns: dict[str, list[Any]] = {name: [] for name in names}
    occurrences = without_media = 0
    for record in records:
        occurrences += 1
        media = record.get("media") or []
        if not media:
            without_media += 1
        gbif_id = _text(record.get("gbifID") or record.get("key"))
        for index, item in enumerate(media):
            columns["gbifID"].append(gbif_id)
            columns["media_index"].append(index)
            for name in MEDIA_COLUMNS:
                value = _text(item.get(name))
                columns[name].append((value or "").strip() or None if name == "identifier" else value)  # " http://"
            columns["occurrence_license"].append(_text(record.get("license")))
            for name in names[len(MEDIA_COLUMNS) + 3 :]:
                value = record.get(name)
                columns[name].append(_number(value) if name in DOUBLE_FIELDS else _text(value))
    types = {
        name: pa.int32() if name == "media_index" else pa.float64() if name in DOUBLE_FIELDS else pa.string()
        for name in names
    }
    arrow = pa.table({name: pa.array(values, type=types[name]) for name, values in columns.items()})
    select = ", ".join(quote(n) for n in names)
    replace_table(con, table, f"SELECT {select} FROM arrow_records", {"arrow_records": arrow})
    notes = []
    if without_media:
        notes.append(f"{without_media} of {occurrences} occurrences have no media item")
    return IngestResult(
        format="search",
        occurrences=occurrences,
        media_rows=arrow.num_rows,
        rows_loaded=arrow.num_rows,
        skipped={"occurrence_without_media": without_media} if without_media else {},
        notes=notes,
        seconds=time.monotonic() - started,
    )
