"""One function per asset, free of Dagster: the glue between recipe, settings and domain code.

Assets, the command line and tests call these. Each step reads what its upstream left in the
dataset home and writes its own output there, atomically, so any step can be re-run alone.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from gbif_assets.files import write_json_atomic
from gbif_assets.ingest.schema import literal
from gbif_assets.recipe import Recipe
from gbif_assets.settings import Settings, duckdb_memory_from_env

STATE_DIR = "state"
REQUEST_STATE = "download_request.json"
ARCHIVE_STATE = "archive.json"


class StepError(RuntimeError):
    """A step cannot run with what is on disk; the message says what to run first."""


# -- files in the dataset home ------------------------------------------------------------------


def read_state(home: Path, name: str) -> dict[str, Any] | None:
    """A step's hand-off file, or None when that step never ran."""
    path = home / STATE_DIR / name
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def open_warehouse(home: Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """The dataset's DuckDB file; only unpartitioned steps open it for writing."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "warehouse.duckdb"
    if read_only and not path.exists():
        raise StepError(f"{path} does not exist yet: materialize `occurrences` first")
    con = duckdb.connect(str(path), read_only=read_only)
    con.execute("SET threads = 2")
    con.execute("SET preserve_insertion_order = false")
    # DuckDB takes 80% of RAM by default; a bounded budget spills to disk instead (8M-row manifest: 1.6 GB RSS)
    con.execute(f"SET memory_limit = {literal(duckdb_memory_from_env())}")
    if not read_only:
        con.execute(f"SET temp_directory = {literal(home / '.duckdb_tmp')}")
    manifest = home / "metadata" / "manifest.parquet"
    if not read_only and manifest.exists():  # the view holds an absolute path: follow a moved home
        from gbif_assets.manifest import point_manifest_view

        point_manifest_view(con, manifest)
    return con


def _client(settings: Settings):
    from gbif_assets.gbif import GbifClient

    return GbifClient(settings.api_url, settings.username, settings.password, settings.email)


def require_credentials(settings: Settings, why: str) -> None:
    """Download mode needs a GBIF account; say which variables are missing before anything runs."""
    missing = [
        name
        for name, value in (
            ("GBIF_USERNAME", settings.username),
            ("GBIF_PASSWORD", settings.password),
            ("GBIF_EMAIL", settings.email),
        )
        if not value
    ]
    if missing:
        raise StepError(f"{why} needs a GBIF account: set {', '.join(missing)}")


# -- download_request / sensor ------------------------------------------------------------------


@dataclass
class DownloadRequest:
    """A download GBIF accepted for this recipe."""

    key: str
    predicate: dict[str, Any]
    note: str


def request_download(recipe: Recipe, settings: Settings, home: Path) -> DownloadRequest:
    """Post the recipe's predicate; GBIF gives the same key back for a repeat within 48 h."""
    require_credentials(settings, "download mode")
    predicate = recipe.predicate()

    async def go() -> str:
        async with _client(settings) as client:
            return await client.request_download(predicate)

    key = asyncio.run(go())
    previous = read_state(home, REQUEST_STATE)
    note = "same key as the previous request" if previous and previous.get("key") == key else "new request"
    write_json_atomic(
        home / STATE_DIR / REQUEST_STATE,
        {"key": key, "predicate": predicate, "requested_at": dt.datetime.now(dt.UTC).isoformat()},
    )
    return DownloadRequest(key=key, predicate=predicate, note=note)


def download_status(settings: Settings, key: str) -> dict[str, Any]:
    """GBIF's status document for a download key or DOI."""

    async def go() -> dict[str, Any]:
        async with _client(settings) as client:
            return await client.download_status(key)

    return asyncio.run(go())


def pending_download_status(settings: Settings, home: Path) -> tuple[str, str] | None:
    """(key, status) of the requested download, or None when nothing was requested."""
    state = read_state(home, REQUEST_STATE)
    if state is None:
        return None
    return state["key"], str(download_status(settings, state["key"]).get("status"))


# -- occurrence_archive -------------------------------------------------------------------------


@dataclass
class ArchiveResult:
    """The verified archive on disk and what GBIF says about it."""

    key: str
    doi: str | None
    path: Path
    size: int
    total_records: int
    fetched: bool
    citation: str | None
    format: str


def _archive_key(recipe: Recipe, home: Path) -> str:
    if recipe.source.mode == "existing":
        assert recipe.source.key is not None
        return recipe.source.key
    state = read_state(home, REQUEST_STATE)
    if state is None:
        raise StepError("no download was requested yet: materialize `download_request` first")
    return state["key"]


def fetch_archive(recipe: Recipe, settings: Settings, home: Path) -> ArchiveResult:
    """Resolve key or DOI, check the download is ready, and fetch the zip once per key."""
    from gbif_assets.gbif import DownloadGone, GbifError

    wanted = _archive_key(recipe, home)

    async def go() -> ArchiveResult:
        async with _client(settings) as client:
            status = await client.download_status(wanted)
            key = status["key"]
            state = status.get("status")
            dest = home / "archive" / f"{key}.zip"
            if state == "FILE_ERASED":
                kept = read_state(home, ARCHIVE_STATE) or {}
                if kept.get("key") == key and dest.exists() and dest.stat().st_size == kept.get("size"):
                    # GBIF erased its copy, ours is whole: the DOI still cites it
                    return ArchiveResult(key=key, doi=status.get("doi") or kept.get("doi"), path=dest,
                                         size=dest.stat().st_size, total_records=int(kept.get("total_records") or 0),
                                         fetched=False, citation=kept.get("citation"),
                                         format=str(status.get("request", {}).get("format", "DWCA")))  # fmt: skip
                raise DownloadGone(f"download {key} was erased by GBIF: request a new download")
            if state in ("FAILED", "KILLED", "CANCELLED"):
                raise GbifError(f"download {key} ended {state} at GBIF and has no file: give another key, "
                                "or use download mode to request one")  # fmt: skip
            if state != "SUCCEEDED" and recipe.source.mode == "existing":
                raise StepError(f"download {key} is {state} at GBIF, not SUCCEEDED yet: run again once it is")
            if state != "SUCCEEDED":
                raise StepError(
                    f"download {key} is {state}, not SUCCEEDED: the `gbif_download_status` sensor "
                    "starts this asset when GBIF is done"
                )
            fetched = not dest.exists()
            path = await client.fetch_archive(key, dest)
            try:
                citation = await client.citation(key)
            except Exception:  # citation text is a nicety; the DOI is what matters
                citation = None
            return ArchiveResult(
                key=key,
                doi=status.get("doi"),
                path=path,
                size=path.stat().st_size,
                total_records=int(status.get("totalRecords") or 0),
                fetched=fetched,
                citation=citation,
                format=str(status.get("request", {}).get("format", "DWCA")),
            )

    result = asyncio.run(go())
    write_json_atomic(
        home / STATE_DIR / ARCHIVE_STATE,
        {
            "key": result.key,
            "doi": result.doi,
            "path": str(result.path),
            "size": result.size,
            "total_records": result.total_records,
            "citation": result.citation,
        },
    )
    return result


# -- occurrences --------------------------------------------------------------------------------


@dataclass
class OccurrencesResult:
    """What went into the `occurrences` table and what was skipped, and why."""

    rows: int
    occurrences: int
    source: str
    seconds: float
    skipped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    request_parameters: list[dict[str, Any]] = field(default_factory=list)
    per_stream: list[dict[str, Any]] = field(default_factory=list)


def _need_per_stream(recipe: Recipe) -> int | None:
    balance = recipe.balance
    if balance.nb_samples_per_stream:
        return balance.nb_samples_per_stream
    if balance.nb_samples and balance.nb_samples > 0:
        streams = 1
        for field_name in balance.split_streams_by:
            streams *= max(1, len((recipe.source.query or {}).get(field_name, [])))
        return -(-balance.nb_samples // streams)
    return None


def load_occurrences(recipe: Recipe, settings: Settings, home: Path) -> OccurrencesResult:
    """DwC-A to DuckDB (download/existing), or a paged, never-truncated search (search mode)."""
    from gbif_assets.ingest import load_archive, load_search_records, required_fields

    fields = required_fields(recipe)
    started = time.monotonic()
    con = open_warehouse(home)
    try:
        if recipe.source.mode == "search":
            from gbif_assets.gbif import harvest

            async def go():
                async with _client(settings) as client:
                    return await harvest(
                        client,
                        recipe.source.query or {},
                        recipe.balance.split_streams_by,
                        _need_per_stream(recipe),
                        recipe.filters.media_types,
                    )

            records, report = asyncio.run(go())
            ingest = load_search_records(con, records, fields)
            return OccurrencesResult(
                rows=ingest.rows_loaded,
                occurrences=ingest.occurrences,
                source="occurrence search API",
                seconds=time.monotonic() - started,
                skipped=dict(ingest.skipped),
                notes=list(ingest.notes) + list(getattr(report, "notes", [])),
                request_parameters=report.requests_as_rows(),
                per_stream=report.streams_as_rows(),
            )
        state = read_state(home, ARCHIVE_STATE)
        if state is None or not Path(state["path"]).exists():
            raise StepError("no archive on disk: materialize `occurrence_archive` first")
        ingest = load_archive(Path(state["path"]), con, fields)
        return OccurrencesResult(
            rows=ingest.rows_loaded,
            occurrences=ingest.occurrences,
            source=f"{ingest.format} archive {Path(state['path']).name}",
            seconds=time.monotonic() - started,
            skipped=dict(ingest.skipped),
            notes=list(ingest.notes),
        )
    finally:
        con.close()


# -- media_manifest -----------------------------------------------------------------------------


def build_media_manifest(recipe: Recipe, home: Path):
    """Filters, balance and split in DuckDB; exports the Parquet the image partitions read."""
    from gbif_assets.manifest import build_manifest, class_distribution_plot, write_excluded

    con = open_warehouse(home)
    try:
        tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
        if "occurrences" not in tables:
            raise StepError("table `occurrences` is missing: materialize `occurrences` first")
        result = build_manifest(con, recipe, home / "metadata" / "manifest.parquet")
        if excluded := write_excluded(con, home):
            result.notes.append(
                f"{excluded} image(s) on disk now refused by the recipe's filters: the next images run removes them"
            )
    finally:
        con.close()
    if result.per_label:
        result.class_distribution = class_distribution_plot(
            result.per_label, home / "reports" / "class_distribution.png"
        )
    return result


def manifest_labels(home: Path) -> list[str]:
    """Labels in the exported manifest, most selected first (empty when there is none)."""
    path = home / "metadata" / "manifest.parquet"
    if not path.exists():
        return []
    con = duckdb.connect()
    try:
        rows = con.execute(
            "SELECT label FROM read_parquet(?) GROUP BY label ORDER BY count(*) FILTER (WHERE selected) DESC, label",
            [str(path)],
        ).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def check_split_leakage(home: Path) -> list[str]:
    """No occurrence and no URL in two splits."""
    from gbif_assets.manifest import check_split_leakage as leakage

    con = open_warehouse(home, read_only=True)
    try:
        return leakage(con)
    finally:
        con.close()


def check_candidates_selected(home: Path) -> list[str]:
    """An empty manifest is a valid outcome (a taxon with no images on GBIF yet), not a failure,
    but a user must hear why nothing will be downloaded: no media in the source, or filters that
    removed it all."""
    con = open_warehouse(home, read_only=True)
    try:
        selected = con.execute("SELECT count(*) FILTER (WHERE selected) FROM media_manifest").fetchone()[0]
        if selected:
            return []
        media = con.execute("SELECT count(*) FROM occurrences").fetchone()[0]
    finally:
        con.close()
    if not media:
        return ["no media: the source's occurrences carry no image links, so there is nothing to download"]
    return [
        f"no candidate selected: `occurrences` holds {media:,} media items and the recipe's filters "
        "(licences, publishers, hosts, formats) removed them all; the funnel is in media_manifest's metadata"
    ]


# -- images -------------------------------------------------------------------------------------


def fetch_config(recipe: Recipe, settings: Settings):
    """The engine's settings from the recipe's `download` block and the environment."""
    from gbif_assets.fetch import FetchConfig

    d = recipe.download
    return FetchConfig(
        concurrency=d.concurrency,
        per_host=d.per_host,
        timeout_s=d.timeout_s,
        retries=d.retries,
        max_bytes=d.max_bytes,
        max_pixels=d.max_pixels,
        resize_max_side=d.resize_max_side,
        gbif_image_cache_fallback=d.gbif_image_cache_fallback,
        decode_check=d.decode_check,
        image_cache_base=f"{settings.api_url}/image/cache",
        allow_private_hosts=settings.allow_private_hosts,
        processes=settings.fetch_processes,
        formats=tuple(recipe.filters.formats),
    )


def progress_line(label: str, figures: dict[str, Any]) -> str:
    """One log line: done / target, rate, failures by class, ETA."""
    failures = figures.get("failures") or {}
    eta = figures.get("eta_s")
    return (
        f"[{label}] {figures.get('done', 0)}/{figures.get('target', 0)} images, "
        f"{figures.get('rate', 0):.1f}/s"
        + (", failures " + ", ".join(f"{k}={v}" for k, v in sorted(failures.items())) if failures else "")
        + (f", ETA {eta:.0f} s" if eta else "")
    )


def download_images(recipe: Recipe, settings: Settings, home: Path, label: str, report=None):
    """One label partition: fetch to quota, write its own Parquet files."""
    from gbif_assets.fetch import download_label

    return download_label(
        home / "metadata" / "manifest.parquet",
        label,
        home,
        fetch_config(recipe, settings),
        (lambda p: report(p.as_dict())) if report else None,
        vanished=recipe.refresh_vanished,
    )


# -- image_metadata and reports -----------------------------------------------------------------


def merge_metadata(recipe: Recipe, home: Path):
    """All partitions merged and de-duplicated, plus the DuckDB `images` table and pictures."""
    from gbif_assets.reports.metadata import merge_image_metadata

    con = open_warehouse(home)
    try:
        return merge_image_metadata(home, con)
    finally:
        con.close()


def check_files_match(home: Path) -> list[str]:
    from gbif_assets.reports.metadata import check_files_match as files_match

    return files_match(home)


def check_hash_leakage(home: Path) -> list[str]:
    from gbif_assets.reports.metadata import check_hash_leakage as leakage

    return leakage(home)


def check_licenses(recipe: Recipe, home: Path) -> list[str]:
    from gbif_assets.reports.metadata import check_licenses as licenses

    return licenses(home, list(recipe.filters.licenses))


def check_quota(recipe: Recipe, home: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Labels with fewer kept images than `download.min_per_label`; a manifest label that kept
    nothing at all (every link dead) counts too."""
    counts = dict.fromkeys(manifest_labels(home), 0)
    for (label, _split), n in image_counts(home).items():
        counts[label] = counts.get(label, 0) + n
    need = recipe.download.min_per_label
    rows = [{"label": k, "images": v, "min_per_label": need} for k, v in sorted(counts.items())]
    return [f"label {r['label']}: {r['images']} images < {need}" for r in rows if r["images"] < need], rows


def license_report(recipe: Recipe, settings: Settings, home: Path):
    from gbif_assets.reports.licenses import license_report as report

    return report(home)


def attribution(recipe: Recipe, settings: Settings, home: Path):
    from gbif_assets.reports.licenses import attribution as attribute

    return attribute(home)


def citation(recipe: Recipe, settings: Settings, home: Path):
    """Download DOI and GBIF's citation text, or a registered derived dataset in search mode."""
    from gbif_assets.reports.citation import derived_dataset_request, write_citation

    if recipe.source.mode != "search":
        state = read_state(home, ARCHIVE_STATE) or {}
        return write_citation(home, recipe.name, recipe.source.mode, state.get("doi"), state.get("citation"))
    params = "&".join(f"{k}={v}" for k, v in recipe.search_params())
    body = derived_dataset_request(
        home,
        title=f"{recipe.name}: image training set from GBIF occurrence media",
        source_url=f"https://www.gbif.org/occurrence/search?{params}",
        description=recipe.description
        or f"Images of {recipe.name} selected by gbif-assets from a GBIF occurrence search.",
    )
    answer = _registered_before(home, body)  # the same request again (a resumed build): the same DOI
    if answer is None and settings.username and settings.password and body["relatedDatasets"]:

        async def register() -> dict[str, Any]:
            async with _client(settings) as client:
                return await client.create_derived_dataset(
                    body["title"],
                    body["sourceUrl"],
                    body["relatedDatasets"],
                    description=body.get("description"),
                )

        answer = asyncio.run(register())
    return write_citation(home, recipe.name, "search", None, None, derived_request=body, derived_answer=answer)


def _registered_before(home: Path, body: dict[str, Any]) -> dict[str, Any] | None:
    """GBIF's answer to an identical earlier registration: every registration mints a new DOI, so a
    rebuild that would send the same request keeps the DOI it has."""
    reports = home / "reports"
    try:
        request = json.loads((reports / "derived_dataset_request.json").read_text(encoding="utf-8"))
        answer = json.loads((reports / "derived_dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return answer if request == body and answer.get("doi") else None


def link_rot_report(recipe: Recipe, settings: Settings, home: Path):
    from gbif_assets.reports.linkrot import link_rot_report as report

    return report(home)


@dataclass
class ExportsResult:
    """Exports and pictures written for the user."""

    rows: int
    hf_metadata: Path
    croissant: Path
    class_balance: Path
    contact_sheets: list[str]
    per_label: list[dict[str, Any]]
    first_contact_sheet: Path | None = None


def exports(recipe: Recipe, settings: Settings, home: Path) -> ExportsResult:
    """HF imagefolder metadata, Croissant JSON-LD, contact sheets and the class-balance plot."""
    from gbif_assets.reports.exports import export_all
    from gbif_assets.reports.pictures import class_balance_plot, contact_sheets

    cite = home / "reports" / "citation.md"
    text = cite.read_text(encoding="utf-8").split("> ", 1)[-1].split("\n", 1)[0] if cite.exists() else "GBIF.org"
    result = export_all(home, recipe.name, recipe.description or f"GBIF image training set {recipe.name}", text)
    plot, per_label = class_balance_plot(home)
    sheets = contact_sheets(home)
    return ExportsResult(
        rows=result.rows,
        hf_metadata=result.hf_metadata,
        croissant=result.croissant,
        class_balance=plot,
        contact_sheets=[str(p.relative_to(home)) for p in sheets],
        per_label=per_label,
        first_contact_sheet=sheets[0] if sheets else None,
    )


# -- summary ------------------------------------------------------------------------------------


def image_counts(home: Path) -> dict[tuple[str, str], int]:
    """(label, split) -> images, from the merged metadata or else the partition files."""
    merged = home / "metadata" / "images.parquet"
    parts = sorted((home / "metadata" / "partitions").glob("*.parquet"))
    if merged.exists():
        source = f"read_parquet({literal(merged)})"
    elif parts:
        source = "read_parquet([" + ", ".join(literal(p) for p in parts) + "])"
    else:
        return {}
    con = duckdb.connect()
    try:
        rows = con.execute(f"SELECT label, split, count(*) FROM {source} GROUP BY ALL").fetchall()
    finally:
        con.close()
    return {(label, split): int(n) for label, split, n in rows}


def failure_counts(home: Path) -> dict[str, int]:
    """Failed fetch attempts by error class, over every label's log."""
    logs = sorted((home / "metadata" / "downloads").glob("*.parquet"))
    if not logs:
        return {}
    con = duckdb.connect()
    try:
        rows = con.execute(
            "SELECT error, count(*) FROM read_parquet(["
            + ", ".join(literal(p) for p in logs)
            + "]) WHERE error IS NOT NULL GROUP BY error ORDER BY 2 DESC"
        ).fetchall()
    finally:
        con.close()
    return {e: int(n) for e, n in rows}
