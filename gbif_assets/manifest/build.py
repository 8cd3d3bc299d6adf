"""`media_manifest`: which images become the training set, decided in DuckDB SQL.

Filters run as a funnel (each step's removals are counted), then balanced sampling with gbif-dl's
semantics but a seeded random order inside each stream, then a split that depends only on
(seed, gbifID), so a refresh never moves an image between train and test.

Sampling equations. Streams s = 1..S are the distinct value combinations of
`balance.split_streams_by` (one stream when empty); n_s is the number of eligible candidates.

- `nb_samples_per_stream = k`:      t_s = min(n_s, k)
- `nb_samples = N` (N = -1 means N = S * min_s n_s, the largest balanced set):
    * unweighted (round robin): t_s = min(n_s, c, q) + [s among the first r streams still open],
      where q is the largest level with sum_s min(n_s, c, q) <= N ("water filling"),
      c = k when also given (else unbounded) and r = N - sum_s min(n_s, c, q) remainder units
      go to streams in stream-key order that still have candidates;
    * weighted: t_s = min(n_s, c, floor(N * n_s / sum n)) and the remainder goes by largest
      fractional part.
- neither: t_s = n_s (everything).
Inside a stream, candidates are ranked by md5_number(seed:url) (seeded, machine-independent); the first
t_s ranks are `selected`, the rest are the reserve the downloader uses, in rank order, to replace
dead links from the same stream.
Split: u = (md5_number(seed:split:gbifID) mod 10^9) / 10^9; train when u < f_train, val when
u < f_train + f_val, else test. All media of one occurrence share u, hence the split.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from gbif_assets.ingest.schema import quote
from gbif_assets.ingest.tables import replace_table
from gbif_assets.manifest.licenses import register_license_map


@dataclass
class ManifestResult:
    """What the manifest holds and how it got there (the asset's metadata)."""

    rows: int
    selected: int
    labels: list[str]
    streams: int
    funnel: list[dict[str, Any]] = field(default_factory=list)
    per_label: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    class_distribution: Path | None = None


def stream_targets(
    sizes: dict[str, int], nb_samples: int | None, per_stream: int | None, weighted: bool
) -> dict[str, int]:
    """t_s for every stream, per the module docstring's equations."""
    if not sizes:
        return {}
    cap = per_stream if per_stream is not None else math.inf
    if nb_samples is None:
        return {s: int(min(n, cap)) for s, n in sizes.items()}
    total = len(sizes) * min(sizes.values()) if nb_samples == -1 else nb_samples
    limited = {s: int(min(n, cap)) for s, n in sizes.items()}
    if sum(limited.values()) <= total:
        return limited
    if weighted:
        whole = sum(sizes.values())
        raw = {s: total * n / whole for s, n in sizes.items()}
        targets = {s: int(min(limited[s], math.floor(raw[s]))) for s in sizes}
        left = total - sum(targets.values())
        order = sorted(sizes, key=lambda s: (-(raw[s] - math.floor(raw[s])), s))
        while left > 0:  # largest fractional parts first; capped streams pass their share on
            open_streams = [s for s in order if targets[s] < limited[s]]
            for s in open_streams[:left]:
                targets[s] += 1
            left -= len(open_streams[:left])
        return targets
    low, high = 0, max(limited.values())
    while low < high:  # largest level q with sum min(limited, q) <= total
        mid = (low + high + 1) // 2
        if sum(min(v, mid) for v in limited.values()) <= total:
            low = mid
        else:
            high = mid - 1
    targets = {s: min(v, low) for s, v in limited.items()}
    left = total - sum(targets.values())
    for s in sorted(sizes):
        if left <= 0:
            break
        if targets[s] < limited[s]:
            targets[s] += 1
            left -= 1
    return targets


def _in_list(values: list[str]) -> str:
    return "(" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + ")"


def build_manifest(con: duckdb.DuckDBPyConnection, recipe: Any, source: str = "occurrences") -> ManifestResult:
    """(Re)create `media_manifest` from `occurrences` in one transaction."""
    f, b, seed = recipe.filters, recipe.balance, int(recipe.balance.seed)
    label = quote(recipe.label)
    columns = {r[0] for r in con.execute(f"DESCRIBE {quote(source)}").fetchall()}
    for needed in (recipe.label, *b.split_streams_by):
        if needed not in columns:
            raise ValueError(
                f"field {needed!r} (label or split_streams_by) is not in `{source}`: rebuild `occurrences`"
            )
    license_map = register_license_map(con, source, ["license", "occurrence_license"])
    formats = _in_list([x.lower() for x in f.formats])
    types = _in_list([x.lower() for x in f.media_types])
    host_expr = "lower(regexp_extract(identifier, '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/]*@)?([^/:?#]+)', 1))"
    fallback = "TRUE" if f.allow_occurrence_license else "FALSE"
    stream_parts = [f"'{s}=' || coalesce(CAST({quote(s)} AS VARCHAR), '')" for s in b.split_streams_by]
    stream_expr = " || '|' || ".join(stream_parts) if stream_parts else "'(all)'"
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE candidates AS
        SELECT o.*,
               CAST({label} AS VARCHAR) AS label,
               {stream_expr} AS stream,
               CASE WHEN lm.license_id IS NOT NULL THEN lm.license_id
                    WHEN {fallback} THEN lo.license_id END AS license_id,
               CASE WHEN lm.license_id IS NOT NULL THEN 'media'
                    WHEN {fallback} AND lo.license_id IS NOT NULL THEN 'occurrence' END AS license_source,
               {host_expr} AS host,
               coalesce(lower(o."format"),
                        CASE WHEN regexp_matches(lower(o.identifier), '\\.jpe?g($|\\?)') THEN 'image/jpeg'
                             WHEN regexp_matches(lower(o.identifier), '\\.png($|\\?)') THEN 'image/png' END) AS fmt,
               coalesce(lower(o."type"), CASE WHEN lower(o."format") LIKE 'image/%' THEN 'stillimage' END) AS mtype
        FROM {quote(source)} o
        LEFT JOIN {license_map} lm ON lm.raw = o."license"
        LEFT JOIN {license_map} lo ON lo.raw = o.occurrence_license
        """
    )
    funnel: list[dict[str, Any]] = []
    remaining = con.execute("SELECT count(*) FROM candidates").fetchone()[0]
    funnel.append({"step": "media items in occurrences", "removed": 0, "remaining": remaining})

    def step(name: str, keep_sql: str) -> None:
        nonlocal remaining
        con.execute(f"DELETE FROM candidates WHERE NOT coalesce(({keep_sql}), FALSE)")
        now = con.execute("SELECT count(*) FROM candidates").fetchone()[0]
        funnel.append({"step": name, "removed": remaining - now, "remaining": now})
        remaining = now

    step(f"label {recipe.label} missing", "label IS NOT NULL")
    step(f"media type not in {f.media_types}", f"mtype IN {types}")
    step(f"format not in {f.formats}", f"fmt IN {formats}")
    step("URL missing or not http(s)", "regexp_matches(identifier, '^https?://', 'i') AND host <> ''")
    step(
        "licence missing" + ("" if f.allow_occurrence_license else " (occurrence licence not allowed as fallback)"),
        "license_id IS NOT NULL",
    )
    step(f"licence not in {f.licenses}", f"license_id IN {_in_list(f.licenses)}")
    if f.publishers.allow:
        allow = _in_list(f.publishers.allow)
        step(
            "publisher not allowed",
            f'lower("datasetKey") IN {allow} OR lower("publishingOrgKey") IN {allow}',
        )
    if f.publishers.deny:
        deny = _in_list(f.publishers.deny)
        step(
            "publisher denied",
            f"NOT (lower(coalesce(\"datasetKey\", '')) IN {deny}"
            f" OR lower(coalesce(\"publishingOrgKey\", '')) IN {deny})",
        )
    if f.hosts.allow:
        cond = " OR ".join(f"host = '{h}' OR host LIKE '%.{h}'" for h in f.hosts.allow)
        step("host not allowed (strict mode)", cond)
    if f.hosts.deny:
        cond = " OR ".join(f"host = '{h}' OR host LIKE '%.{h}'" for h in f.hosts.deny)
        step("host denied", f"NOT ({cond})")
    step(
        "identical URL kept once",
        f"rowid IN (SELECT arg_min(rowid, md5('{seed}:' || gbifID || ':' || media_index))"
        " FROM candidates GROUP BY identifier)",
    )
    if f.one_media_per_occurrence:
        step(
            "one media per occurrence",
            f"rowid IN (SELECT arg_min(rowid, md5('{seed}:' || identifier)) FROM candidates GROUP BY gbifID)",
        )
    sizes = dict(con.execute("SELECT stream, count(*) FROM candidates GROUP BY stream").fetchall())
    targets = stream_targets(sizes, b.nb_samples, b.nb_samples_per_stream, b.weighted_streams)
    con.execute("CREATE OR REPLACE TEMP TABLE stream_targets (stream VARCHAR, target INTEGER)")
    if targets:
        con.executemany("INSERT INTO stream_targets VALUES (?, ?)", list(targets.items()))
    sp = recipe.split
    select = f"""
        WITH keys AS (  -- rank on a narrow projection: sorting whole rows is what costs
            SELECT rowid AS rid,
                   CAST(row_number() OVER (PARTITION BY stream
                                           ORDER BY md5_number('{seed}:' || identifier)) AS INTEGER) AS rank
            FROM candidates
        ), ranked AS (
            SELECT c.* EXCLUDE (fmt, mtype), k.rank,
                   md5_number('{seed}:split:' || c.gbifID) % 1000000000 / 1e9 AS u
            FROM candidates c JOIN keys k ON c.rowid = k.rid
        ), marked AS (
            SELECT r.* EXCLUDE (u),
                   sha1(r.identifier) AS url_sha1,
                   r.rank <= t.target AS selected,
                   CASE WHEN r.u < {sp.train} THEN 'train'
                        WHEN r.u < {sp.train + sp.val} THEN 'val' ELSE 'test' END AS split
            FROM ranked r JOIN stream_targets t USING (stream)
        ), targets AS (
            SELECT stream, label, CAST(count(*) FILTER (WHERE selected) AS INTEGER) AS stream_target
            FROM marked GROUP BY stream, label
        )
        SELECT m.*, t.stream_target FROM marked m JOIN targets t USING (stream, label)
    """
    rows = replace_table(con, "media_manifest", select)
    per_label = [
        dict(
            zip(
                ("label", "candidates", "selected", "train", "val", "test", "streams"),
                row,
                strict=True,
            )
        )
        for row in con.execute(
            """SELECT label, count(*), count(*) FILTER (WHERE selected),
                      count(*) FILTER (WHERE selected AND split = 'train'),
                      count(*) FILTER (WHERE selected AND split = 'val'),
                      count(*) FILTER (WHERE selected AND split = 'test'), count(DISTINCT stream)
               FROM media_manifest GROUP BY label ORDER BY count(*) FILTER (WHERE selected) DESC, label"""
        ).fetchall()
    ]
    selected = sum(r["selected"] for r in per_label)
    notes = []
    empty = [s for s, t in targets.items() if t == 0]
    if empty:
        notes.append(f"{len(empty)} stream(s) get no sample: {', '.join(sorted(empty)[:10])}")
    return ManifestResult(
        rows=rows,
        selected=selected,
        labels=[r["label"] for r in per_label],
        streams=len(sizes),
        funnel=funnel,
        per_label=per_label,
        notes=notes,
    )


def export_manifest(con: duckdb.DuckDBPyConnection, path: Path) -> Path:
    """Write media_manifest to Parquet atomically; image partitions read this, never DuckDB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    con.execute(
        f"COPY (SELECT * FROM media_manifest ORDER BY label, stream, rank) TO '{tmp.as_posix()}' (FORMAT parquet)"
    )
    os.replace(tmp, path)
    return path


def check_split_leakage(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Occurrences or identical URLs that sit in two splits (must be empty)."""
    problems = [
        f"occurrence {g} is in splits {s}"
        for g, s in con.execute(
            "SELECT gbifID, string_agg(DISTINCT split, ',') FROM media_manifest"
            " GROUP BY gbifID HAVING count(DISTINCT split) > 1 LIMIT 100"
        ).fetchall()
    ]
    problems += [
        f"URL {u} is in splits {s}"
        for u, s in con.execute(
            "SELECT identifier, string_agg(DISTINCT split, ',') FROM media_manifest"
            " GROUP BY identifier HAVING count(DISTINCT split) > 1 LIMIT 100"
        ).fetchall()
    ]
    return problems


def class_distribution_plot(per_label: list[dict[str, Any]], path: Path) -> Path:
    """Bar plot of candidates and selected images per label (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = per_label[:60]
    labels = [str(r["label"]) for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows) + 2), 4), dpi=100)
    x = range(len(rows))
    ax.bar(x, [r["candidates"] for r in rows], color="#c7d7ea", label="candidates")
    ax.bar(x, [r["selected"] for r in rows], color="#2b6cb0", label="selected")
    ax.set_xticks(list(x), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("media items")
    ax.set_title("class distribution" + (" (first 60 labels)" if len(per_label) > 60 else ""))
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
