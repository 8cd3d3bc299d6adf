"""Link rot, as in Table 1 of Pitblado and Cronk: valid and invalid links per taxon, per host,
per publisher and per error class, with the share GBIF's image cache rescued.

A link is valid when the publisher served a verified image; rescued when only the cache did;
invalid when nothing did. Candidates never tried (the quota was met first) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq

from gbif_assets.fetch.partition import ATTEMPT_SCHEMA
from gbif_assets.ingest.schema import literal
from gbif_assets.reports.licenses import md_table, write_csv


@dataclass
class LinkRotReport:
    """Per-label, per-host, per-publisher and per-error link rot."""

    links_tried: int
    valid: int
    rescued_by_gbif_cache: int
    invalid: int
    link_rot_percent: float
    per_label: list[dict[str, Any]]
    per_host: list[dict[str, Any]]
    per_publisher: list[dict[str, Any]]
    per_error: list[dict[str, Any]]
    plot: Path | None
    report_md: str
    warnings: list[str] = field(default_factory=list)


def _rows(con: duckdb.DuckDBPyConnection, sql: str) -> list[dict[str, Any]]:
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def link_rot_report(home: Path) -> LinkRotReport:
    """reports/link_rot_*.csv, link_rot.md and link_rot.png."""
    logs = sorted((home / "metadata" / "downloads").glob("*.parquet"))
    manifest_path = home / "metadata" / "manifest.parquet"
    if logs:
        attempts = "read_parquet([" + ", ".join(literal(p) for p in logs) + "], union_by_name = true)"
    elif manifest_path.exists() and pq.ParquetFile(manifest_path).metadata.num_rows == 0:
        attempts = "no_attempts"  # the manifest selected nothing: no link was tried
    else:
        raise FileNotFoundError(f"{home / 'metadata' / 'downloads'} has no attempt logs: materialize `images` first")
    manifest = literal(manifest_path)
    con = duckdb.connect()
    try:
        con.register("no_attempts", ATTEMPT_SCHEMA.empty_table())
        con.execute(
            f"""CREATE TEMP TABLE links AS
                SELECT a.url, any_value(m.label) AS label,
                       any_value(m."datasetKey") AS "datasetKey",
                       any_value(m."publishingOrgKey") AS "publishingOrgKey",
                       any_value(m.host) AS host,
                       -- a link that served an image of a format the recipe leaves out works
                       bool_or((a.error IS NULL OR a.error = 'unwanted_format') AND a.source = 'publisher')
                           AS publisher_ok,
                       bool_or(a.error IS NULL AND a.source = 'gbif_cache') AS cache_ok,
                       arg_max(coalesce(a.error, 'ok'), a.fetched_at)
                           FILTER (WHERE a.source = 'publisher') AS last_error,
                       arg_max(a.status, a.fetched_at)
                           FILTER (WHERE a.source = 'publisher') AS last_status,
                       -- a link whose publisher was never asked is not judged, even if GBIF's cache then
                       -- served it: its host wanted to be left alone, or this client refused to connect
                       -- (blocked: a private or loopback address, not http(s))
                       bool_or(a.source = 'publisher' AND a.error IS DISTINCT FROM 'host_paused'
                               AND a.error IS DISTINCT FROM 'blocked') AS tried,
                       bool_or(a.source = 'publisher' AND a.error = 'blocked') AS blocked
                FROM {attempts} a
                -- links the manifest no longer holds (a refresh narrowed it) are history, not this dataset's rot
                JOIN read_parquet({manifest}) m ON m.identifier = a.url
                GROUP BY a.url"""
        )
        con.execute(
            """CREATE TEMP VIEW judged AS SELECT *, CASE WHEN publisher_ok THEN 'valid'
                   WHEN cache_ok THEN 'rescued' ELSE 'invalid' END AS verdict FROM links WHERE tried"""
        )

        def grouped(keys: str) -> list[dict[str, Any]]:
            return _rows(
                con,
                f"""SELECT {keys}, count(*) FILTER (WHERE verdict = 'valid') AS valid,
                           count(*) FILTER (WHERE verdict <> 'valid') AS invalid,
                           count(*) FILTER (WHERE verdict = 'rescued') AS rescued_by_gbif_cache,
                           round(100.0 * count(*) FILTER (WHERE verdict <> 'valid') / count(*), 1)
                               AS link_rot_percent
                    FROM judged GROUP BY ALL ORDER BY link_rot_percent DESC, {keys}""",
            )

        per_label = grouped("label")
        per_host = grouped("host")
        per_publisher = grouped('"datasetKey", "publishingOrgKey"')
        per_error = _rows(
            con,
            """SELECT coalesce(last_error, 'ok') AS error_class, last_status AS status,
                      count(*) AS links
               FROM judged WHERE verdict <> 'valid'
               GROUP BY ALL ORDER BY links DESC, error_class, status NULLS FIRST""",
        )
        untried, blocked = con.execute(
            "SELECT count(*) FILTER (WHERE NOT blocked), count(*) FILTER (WHERE blocked) FROM links WHERE NOT tried"
        ).fetchone()
        totals = con.execute(
            """SELECT count(*), count(*) FILTER (WHERE verdict = 'valid'),
                      count(*) FILTER (WHERE verdict = 'rescued'),
                      count(*) FILTER (WHERE verdict = 'invalid') FROM judged"""
        ).fetchone()
    finally:
        con.close()
    tried, valid, rescued, invalid = (int(x) for x in totals)
    percent = round(100.0 * (tried - valid) / tried, 1) if tried else 0.0
    reports = home / "reports"
    write_csv(reports / "link_rot_by_label.csv", per_label)
    write_csv(reports / "link_rot_by_host.csv", per_host)
    write_csv(reports / "link_rot_by_publisher.csv", per_publisher)
    write_csv(reports / "link_rot_by_error.csv", per_error)
    md = (
        f"# Link rot\n\n{tried} links tried: {valid} valid, "
        f"{tried - valid} invalid at the publisher ({percent}%), "
        f"of which {rescued} rescued by GBIF's image cache."
        + (f" {untried} more link(s) not asked for: their host wanted a longer pause than a run waits." * bool(untried))
        + (f" {blocked} link(s) refused by this client, not judged: their address is private or loopback, or they"
           " are not http(s) (`blocked` in metadata/downloads)." * bool(blocked))
        + "\n\n"
        "## Per label (Pitblado & Cronk, Table 1)\n\n"
        + md_table(per_label)
        + "\n## Per host\n\n" + md_table(per_host)
        + "\n## Per publisher\n\n" + md_table(per_publisher)
        + "\n## Per error class\n\n" + md_table(per_error)
    )  # fmt: skip
    (reports / "link_rot.md").write_text(md, encoding="utf-8")
    plot = _plot(per_host, reports / "link_rot.png") if per_host else None
    warnings = [f"{percent}% of tried links are dead at the publisher"] if percent >= 20 else []
    return LinkRotReport(
        tried,
        valid,
        rescued,
        invalid,
        percent,
        per_label,
        per_host[:50],
        per_publisher[:50],
        per_error,
        plot,
        md[:20000],
        warnings,
    )


def _plot(per_host: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = per_host[:30]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.3 * len(rows) + 1)), dpi=100)
    names = [str(r["host"]) for r in rows]
    ax.barh(names, [r["valid"] for r in rows], color="#2f855a", label="valid")
    ax.barh(
        names,
        [r["invalid"] for r in rows],
        left=[r["valid"] for r in rows],
        color="#c53030",
        label="invalid",
    )
    ax.invert_yaxis()
    ax.set_xlabel("links")
    ax.set_title("link rot per host")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
