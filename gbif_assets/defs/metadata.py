"""Turn the domain's result dataclasses into rich Dagster metadata.

Domain results stay plain Python (numbers, lists of row dicts, paths); this one module decides how
each shape looks in the UI: row lists become tables, PNG paths become inline pictures, Markdown
stays Markdown. Secrets never reach it: results carry no credentials.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import dagster as dg

_MAX_TABLE_ROWS = 200
_MAX_INLINE_PNG = 400_000


def _column_type(values: list[Any]) -> str:
    sample = next((v for v in values if v is not None), None)
    if isinstance(sample, bool):
        return "bool"
    if isinstance(sample, int):
        return "int"
    if isinstance(sample, float):
        return "float"
    return "string"


def table_from_rows(rows: list[dict[str, Any]]) -> dg.TableMetadataValue:
    """A list of uniform dicts as a Dagster table (first rows only, so the UI stays fast)."""
    rows = rows[:_MAX_TABLE_ROWS]
    columns = list(rows[0]) if rows else []
    schema = dg.TableSchema(columns=[dg.TableColumn(c, _column_type([r.get(c) for r in rows])) for c in columns])
    records = [dg.TableRecord({c: _scalar(r.get(c)) for c in columns}) for r in rows]
    return dg.MetadataValue.table(records=records, schema=schema)


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def image_md(path: Path, title: str) -> dg.MarkdownMetadataValue:
    """Inline a PNG in the asset's metadata so the picture shows in the UI without a file server."""
    data = path.read_bytes()
    if len(data) > _MAX_INLINE_PNG:
        return dg.MetadataValue.md(f"**{title}**: `{path}` ({len(data):,} bytes, too large to inline)")
    encoded = base64.b64encode(data).decode("ascii")
    return dg.MetadataValue.md(f"**{title}**\n\n![{title}](data:image/png;base64,{encoded})")


def _value(key: str, value: Any, home: Path) -> Any:
    if value is None:
        return None
    if isinstance(value, Path):
        if value.suffix.lower() == ".png" and value.exists():
            return image_md(value, key.replace("_", " "))
        return dg.MetadataValue.path(str(value))
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        if key.endswith("_md") or key == "markdown":
            return dg.MetadataValue.md(value)
        return value
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return table_from_rows(value)
    if isinstance(value, list | tuple | dict):
        return dg.MetadataValue.json(_jsonable(value))
    if dataclasses.is_dataclass(value):
        return dg.MetadataValue.json(_jsonable(dataclasses.asdict(value)))
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path | dt.datetime | dt.date):
        return str(value)
    return value


def to_metadata(result: Any, home: Path) -> dict[str, Any]:
    """Every public field of a result dataclass (or dict) as metadata, shaped by its type."""
    if dataclasses.is_dataclass(result):
        fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    else:
        fields = dict(result)
    metadata: dict[str, Any] = {"dataset_home": dg.MetadataValue.path(str(home))}
    for key, value in fields.items():
        if key.startswith("_"):
            continue
        converted = _value(key, value, home)
        if converted is not None:
            metadata[key] = converted
    if "rows" in fields and isinstance(fields["rows"], int):
        metadata["dagster/row_count"] = fields["rows"]
    return metadata
