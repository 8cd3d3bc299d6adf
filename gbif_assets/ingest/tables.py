"""Swap a table in one transaction, so a failed load leaves the previous table intact."""

from __future__ import annotations

from typing import Any

import duckdb

from gbif_assets.ingest.schema import quote


def replace_table(
    con: duckdb.DuckDBPyConnection,
    table: str,
    select_sql: str,
    register: dict[str, Any] | None = None,
) -> int:
    """`CREATE OR REPLACE TABLE table AS select_sql` atomically; returns the new row count."""
    for name, obj in (register or {}).items():
        con.register(name, obj)
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(f"CREATE OR REPLACE TABLE {quote(table)} AS {select_sql}")
            rows = con.execute(f"SELECT count(*) FROM {quote(table)}").fetchone()[0]
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        for name in register or {}:
            con.unregister(name)
    return int(rows)
