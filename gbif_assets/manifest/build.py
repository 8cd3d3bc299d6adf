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

import contextlib
import ipaddress
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from duckdb.sqltypes import VARCHAR

from gbif_assets.ingest.schema import literal, quote
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


def _md5_mod(expr: str, modulus: int) -> str:
    """md5_number(expr) % modulus in 64-bit arithmetic: UHUGEINT modulo costs 9 s on 8M rows, this 0.7 s.

    With x = hi * 2^64 + lo: x mod m = ((hi mod m) * (2^64 mod m) + lo mod m) mod m; every term
    stays below 2^64 for m <= 10^9, and the value equals the 128-bit form (tested).
    """
    h = f"md5_number({expr})"
    return (
        f"((CAST({h} >> 64 AS UBIGINT) % {modulus}) * {2**64 % modulus}"
        f" + CAST({h} & {2**64 - 1} AS UBIGINT) % {modulus}) % {modulus}"
    )


def _format_sql(column: str) -> str:
    """A media format as the recipe's `formats` name it: lower case, without parameters or spaces,
    image/jpg, image/pjpeg or a bare jpg as image/jpeg (publishers write them all)."""
    from gbif_assets.fetch.verify import PIL_FORMATS
    from gbif_assets.recipe import FORMAT_SYNONYMS

    bare = {name: mime for mime, ext in PIL_FORMATS.values() for name in (ext, mime.split("/", 1)[1])}  # jpg, jpeg...
    cases = " ".join(f"WHEN '{k}' THEN '{v}'" for k, v in {**FORMAT_SYNONYMS, **bare}.items())
    raw = f"nullif(trim(lower(split_part({column}, ';', 1))), '')"
    return f"(CASE {raw} {cases} ELSE {raw} END)"


def _type_sql(column: str) -> str:
    """A media type, lower case, as a DCMI term URI or name (Image is StillImage's parent)."""
    raw = f"nullif(trim(lower(regexp_replace({column}, '^\\s*https?://purl\\.org/dc/dcmitype/', '', 'i'))), '')"
    return f"(CASE {raw} WHEN 'image' THEN 'stillimage' ELSE {raw} END)"


def build_manifest(
    con: duckdb.DuckDBPyConnection, recipe: Any, out: Path, source: str = "occurrences"
) -> ManifestResult:
    """Write the manifest to `out` (Parquet, atomically) and point the `media_manifest` view at it.

    One narrow pass computes, per media row, the first filter it fails (the funnel is one
    GROUP BY), its stream and its seeded rank hash; de-duplication and ranking run on that narrow
    table; the wide columns are read once, by the final write. The Parquet file is the manifest:
    image partitions read it without opening DuckDB, so backfills never meet a database lock.
    """
    f, b, seed = recipe.filters, recipe.balance, int(recipe.balance.seed)
    columns = {r[0] for r in con.execute(f"DESCRIBE {quote(source)}").fetchall()}
    for needed in (recipe.label, *b.split_streams_by):
        if needed not in columns:
            raise ValueError(
                f"field {needed!r} (label or split_streams_by) is not in `{source}`: rebuild `occurrences`, "
                "which loads the fields the recipe names (if GBIF has no such field, check the spelling)"
            )
    counts = con.execute(
        "SELECT count(*), " + ", ".join(f"count({quote(c)})" for c in (recipe.label, *b.split_streams_by))
        + f" FROM {quote(source)}"
    ).fetchall()[0]  # fmt: skip
    for field_name, filled in zip((recipe.label, *b.split_streams_by), counts[1:], strict=True):
        if counts[0] and not filled:  # a misspelt field is a column of NULLs: every row would be one class
            what = "label" if field_name == recipe.label else "balance.split_streams_by"
            raise ValueError(
                f"{what}: {field_name!r} has no value in any of the {counts[0]:,} media rows: no occurrence "
                "carries it, so it cannot tell them apart (a field GBIF does not have reads as empty too)"
            )
    register_idna_host(con)
    license_map = register_license_map(con, source, ["license", "occurrence_license"])
    fallback = "TRUE" if f.allow_occurrence_license else "FALSE"
    stream_parts = [f"'{s}=' || coalesce(CAST(o.{quote(s)} AS VARCHAR), '')" for s in b.split_streams_by]
    derived = f"""CAST(o.{quote(recipe.label)} AS VARCHAR) AS label,
        {" || '|' || ".join(stream_parts) if stream_parts else "'(all)'"} AS stream,
        CASE WHEN lm.license_id IS NOT NULL THEN lm.license_id
             WHEN {fallback} THEN lo.license_id END AS license_id,
        CASE WHEN lm.license_id IS NOT NULL THEN 'media'
             WHEN {fallback} AND lo.license_id IS NOT NULL THEN 'occurrence' END AS license_source,
        {host_sql("o.identifier")} AS host"""
    licensed = f"""{quote(source)} o
        LEFT JOIN {license_map} lm ON lm.raw = o."license"
        LEFT JOIN {license_map} lo ON lo.raw = o.occurrence_license"""
    filters = _filters(recipe)
    first_failed = " ".join(f"WHEN NOT coalesce(({keep}), FALSE) THEN {i}" for i, (_, keep) in enumerate(filters, 1))
    insertion_order = con.execute("SELECT current_setting('preserve_insertion_order')").fetchone()[0]
    con.execute("SET preserve_insertion_order = false")  # the final write need not keep row order
    try:
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE mf_rows AS
            SELECT rid, label, stream, "gbifID", media_index, h,
                   CAST(CASE {first_failed} ELSE 0 END AS SMALLINT) AS failed
            FROM (
                SELECT o.rowid AS rid, {derived}, o."gbifID", o.media_index, o.identifier, o."datasetKey",
                       o."publishingOrgKey", md5_number('{seed}:' || o.identifier) AS h,
                       coalesce({_format_sql('o."format"')},
                                CASE WHEN regexp_matches(lower(o.identifier), '\\.jpe?g($|\\?)') THEN 'image/jpeg'
                                     WHEN regexp_matches(lower(o.identifier), '\\.png($|\\?)') THEN 'image/png'
                                END) AS fmt,
                       coalesce({_type_sql('o."type"')},
                                CASE WHEN {_format_sql('o."format"')} LIKE 'image/%' THEN 'stillimage' END) AS mtype
                FROM {licensed}
            )
            """
        )
        failed = dict(con.execute("SELECT failed, count(*) FROM mf_rows GROUP BY failed").fetchall())
        remaining = sum(failed.values())
        funnel: list[dict[str, Any]] = [{"step": "media items in occurrences", "removed": 0, "remaining": remaining}]

        def record(name: str, removed: int) -> None:
            nonlocal remaining
            remaining -= removed
            funnel.append({"step": name, "removed": removed, "remaining": remaining})

        for i, (name, _) in enumerate(filters, 1):
            record(name, failed.get(i, 0))
        # identical URL kept once: h = md5(seed:url) names the URL; which occurrence keeps it is seeded
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE mf_kept AS
                SELECT arg_min(rid, md5_number('{seed}:' || "gbifID" || ':' || media_index)) AS rid
                FROM mf_rows WHERE failed = 0 GROUP BY h"""
        )
        record("identical URL kept once", remaining - con.execute("SELECT count(*) FROM mf_kept").fetchone()[0])
        if f.one_media_per_occurrence:
            con.execute(
                """CREATE OR REPLACE TEMP TABLE mf_kept AS
                   SELECT arg_min(rid, h) AS rid FROM mf_rows SEMI JOIN mf_kept USING (rid) GROUP BY "gbifID" """
            )
            record("one media per occurrence", remaining - con.execute("SELECT count(*) FROM mf_kept").fetchone()[0])
        con.execute(
            """CREATE OR REPLACE TEMP TABLE mf_ranked AS  -- ranking narrow rows: sorting wide rows is what costs
               SELECT rid, label, stream, CAST(row_number() OVER (PARTITION BY stream ORDER BY h) AS INTEGER) AS rank
               FROM mf_rows SEMI JOIN mf_kept USING (rid)"""
        )
        sizes = dict(con.execute("SELECT stream, count(*) FROM mf_ranked GROUP BY stream").fetchall())
        targets = stream_targets(sizes, b.nb_samples, b.nb_samples_per_stream, b.weighted_streams)
        con.execute("CREATE OR REPLACE TEMP TABLE stream_targets (stream VARCHAR, target INTEGER)")
        if targets:
            con.executemany("INSERT INTO stream_targets VALUES (?, ?)", list(targets.items()))
        con.execute(
            """CREATE OR REPLACE TEMP TABLE mf_marked AS  -- stream_target: what one label's partition must fetch
               SELECT r.rid, r.rank, r.rank <= t.target AS selected,
                      CAST(count(*) FILTER (WHERE r.rank <= t.target) OVER (PARTITION BY r.stream, r.label)
                           AS INTEGER) AS stream_target
               FROM mf_ranked r JOIN stream_targets t USING (stream)"""
        )
        sp = recipe.split
        u = _md5_mod(f"'{seed}:split:' || o.\"gbifID\"", 10**9)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        con.execute(
            f"""COPY (
                SELECT o.*, {derived}, m.rank, sha1(o.identifier) AS url_sha1, m.selected,
                       CASE WHEN {u} < {round(sp.train * 10**9)} THEN 'train'
                            WHEN {u} < {round((sp.train + sp.val) * 10**9)} THEN 'val' ELSE 'test' END AS split,
                       m.stream_target
                FROM {licensed} JOIN mf_marked m ON o.rowid = m.rid
            ) TO {literal(tmp.resolve())} (FORMAT parquet)"""
        )
        os.replace(tmp, out)
        point_manifest_view(con, out)
    finally:
        con.execute(f"SET preserve_insertion_order = {insertion_order}")
        for table in ("mf_rows", "mf_kept", "mf_ranked", "mf_marked"):
            con.execute(f"DROP TABLE IF EXISTS temp.{table}")
    per_label = [
        dict(zip(("label", "candidates", "selected", "train", "val", "test", "streams"), row, strict=True))
        for row in con.execute(
            """SELECT label, count(*), count(*) FILTER (WHERE selected),
                      count(*) FILTER (WHERE selected AND split = 'train'),
                      count(*) FILTER (WHERE selected AND split = 'val'),
                      count(*) FILTER (WHERE selected AND split = 'test'), count(DISTINCT stream)
               FROM media_manifest GROUP BY label ORDER BY count(*) FILTER (WHERE selected) DESC, label"""
        ).fetchall()
    ]
    empty = [s for s, t in targets.items() if t == 0]
    notes = [f"{len(empty)} stream(s) get no sample: {', '.join(sorted(empty)[:10])}"] if empty else []
    notes += _shortfall_notes(b, sizes, targets) + _empty_split_notes(recipe, per_label)
    return ManifestResult(
        rows=remaining,
        selected=sum(r["selected"] for r in per_label),
        labels=[r["label"] for r in per_label],
        streams=len(sizes),
        funnel=funnel,
        per_label=per_label,
        notes=notes,
    )


def _host_match(entry: str) -> str:
    """SQL matching a host filter entry: an address only itself (0.0.2 is not 127.0.0.2), a name
    itself and its subdomains, "*.name" its subdomains only."""
    if entry.startswith("*."):
        return f"host LIKE {literal('%.' + entry[2:])}"
    with contextlib.suppress(ValueError):
        return f"host = {literal(str(ipaddress.ip_address(entry)))}"
    return f"(host = {literal(entry)} OR host LIKE {literal('%.' + entry)})"


def _filters(recipe: Any) -> list[tuple[str, str]]:
    """The recipe's row filters in funnel order: (what the funnel calls it, SQL that keeps a row)."""
    f = recipe.filters
    filters = [
        (f"label {recipe.label} missing", "label IS NOT NULL"),
        (f"media type not in {f.media_types}", f"mtype IN {_in_list([x.lower() for x in f.media_types])}"),
        (f"format not in {f.formats}", f"fmt IN {_in_list([x.lower() for x in f.formats])}"),
        ("URL missing or not http(s)", "regexp_matches(identifier, '^https?://', 'i') AND host <> ''"),
        (
            "licence missing" + ("" if f.allow_occurrence_license else " (occurrence licence not allowed as fallback)"),
            "license_id IS NOT NULL",
        ),
        (f"licence not in {f.licenses}", f"license_id IN {_in_list(f.licenses)}"),
    ]
    if f.publishers.allow:
        allow = _in_list(f.publishers.allow)
        filters.append(
            ("publisher not allowed", f'lower("datasetKey") IN {allow} OR lower("publishingOrgKey") IN {allow}')
        )
    if f.publishers.deny:
        deny = _in_list(f.publishers.deny)
        keys = "lower(coalesce(\"datasetKey\", '')) IN {0} OR lower(coalesce(\"publishingOrgKey\", '')) IN {0}"
        filters.append(("publisher denied", f"NOT ({keys.format(deny)})"))
    if f.hosts.allow:
        cond = " OR ".join(_host_match(h) for h in f.hosts.allow)
        filters.append(("host not allowed (strict mode)", cond))
    if f.hosts.deny:
        cond = " OR ".join(_host_match(h) for h in f.hosts.deny)
        filters.append(("host denied", f"NOT ({cond})"))
    return filters


def write_excluded(con: duckdb.DuckDBPyConnection, home: Path, source: str = "occurrences") -> int:
    """metadata/excluded.parquet: the images on disk whose media GBIF still has but the manifest no
    longer takes (a licence or host the recipe now refuses). A refresh removes these whatever
    `refresh_vanished` says: that policy is for media that left GBIF, not for the recipe's own
    filters. Only files on disk are looked up, so a first build pays nothing."""
    out = home / "metadata" / "excluded.parquet"
    on_disk = {p.name.split(".", 1)[0] for p in (home / "images").glob("*/*/*.*") if not p.name.startswith(".")}
    on_disk.discard("metadata")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not on_disk:  # a first build: nothing to look up (and no 8M-row hash pass)
        pq.write_table(pa.table({"url_sha1": pa.array([], pa.string())}), out)
        return 0
    con.register("on_disk", pa.table({"url_sha1": pa.array(sorted(on_disk), pa.string())}))
    try:
        tmp = out.with_name(out.name + ".tmp")
        con.execute(
            f"""COPY (
                SELECT DISTINCT d.url_sha1 FROM on_disk d
                JOIN (SELECT sha1(identifier) AS url_sha1 FROM {quote(source)}) o USING (url_sha1)
                ANTI JOIN media_manifest m USING (url_sha1)
            ) TO {literal(tmp.resolve())} (FORMAT parquet)"""
        )
        os.replace(tmp, out)
    finally:
        con.unregister("on_disk")
    return pq.ParquetFile(out).metadata.num_rows


def register_idna_host(con: duckdb.DuckDBPyConnection) -> None:
    """`idna_host(url)`: the engine's own reading of a URL's host, for the rare non-ASCII host
    (bücher.example connects as xn--bcher-kva.example, and a host filter must see that name)."""
    from gbif_assets.fetch.engine import host_of

    with contextlib.suppress(duckdb.Error):
        con.remove_function("idna_host")
    con.create_function("idna_host", host_of, [VARCHAR], VARCHAR, side_effects=False)


def host_sql(url: str) -> str:
    """SQL for the lower-cased host a request to `url` connects to, read as the fetch engine's
    parser (yarl) reads it: the authority ends at the first / ? or #, and the user info at its last
    "@" (so "http://a.org?@b.org/" is a.org, and a host filter cannot be fooled). IPv6 hosts lose
    their brackets. A test holds it to `fetch.engine.host_of` on tricky URLs."""
    pattern = r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^/?#\\]*@)?(\[[^\]/?#\\]*\]|[^/:?#@\[\]\\]*)(?:[:/?#]|$)"
    host = f"lower(trim(regexp_extract({url}, '{pattern}', 1), '[]'))"
    # strlen counts bytes, length characters: equal for an ASCII URL (nearly all), a cheap test
    return f"(CASE WHEN strlen({url}) = length({url}) THEN {host} ELSE idna_host({url}) END)"


def point_manifest_view(con: duckdb.DuckDBPyConnection, parquet: Path) -> None:
    """`media_manifest` in the warehouse is a view over the Parquet manifest (it replaces an older table)."""
    kind = con.execute(
        "SELECT table_type FROM information_schema.tables WHERE table_name = 'media_manifest'"
        " AND table_schema = 'main' AND table_catalog = current_database()"
    ).fetchone()
    con.execute("BEGIN TRANSACTION")
    try:
        if kind and kind[0] == "BASE TABLE":
            con.execute("DROP TABLE main.media_manifest")
        con.execute(
            f"CREATE OR REPLACE VIEW main.media_manifest AS SELECT * FROM read_parquet({literal(parquet.resolve())})"
        )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


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


def _shortfall_notes(balance: Any, sizes: dict[str, int], targets: dict[str, int]) -> list[str]:
    """When the balance asks for more than the filters left: a set smaller and less even than
    the recipe says should not pass unremarked."""
    notes = []
    got = sum(targets.values())
    if balance.nb_samples not in (None, -1) and got < balance.nb_samples:
        notes.append(
            f"nb_samples {balance.nb_samples} asked for, {got} candidates pass the filters: all are selected, "
            f"{min(targets.values())} to {max(targets.values())} per stream"
        )
    k = balance.nb_samples_per_stream
    if k is not None and (short := sorted(s for s, n in sizes.items() if n < k)):
        notes.append(
            f"{len(short)} of {len(sizes)} stream(s) have fewer than nb_samples_per_stream {k} candidates "
            f"(the smallest {min(sizes[s] for s in short)}): {', '.join(short[:10])}"
        )
    return notes


def _empty_split_notes(recipe: Any, per_label: list[dict[str, Any]]) -> list[str]:
    """Labels with no image in a split the recipe gives a share to (too few images for it)."""
    notes = []
    for split in ("train", "val", "test"):
        share = getattr(recipe.split, split)
        missing = [str(r["label"]) for r in per_label if r["selected"] and not r[split]]
        if share > 0 and missing:
            notes.append(
                f"{len(missing)} label(s) have no {split} image (too few selected for a {share:g} share): "
                + ", ".join(missing[:10])
            )
    return notes
