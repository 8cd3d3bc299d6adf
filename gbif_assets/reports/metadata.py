"""`image_metadata`: every partition's kept images merged with the manifest, de-duplicated.

Exact duplicates (same sha256) keep one copy: the train copy first, then the lowest rank, then
the path, so the choice is stable; the others are listed in metadata/duplicates.parquet and their
files removed, so every file has a row and no image sits in two splits.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from gbif_assets.fetch.partition import KEPT_SCHEMA, MTIME_SLACK_S
from gbif_assets.ingest.schema import literal
from gbif_assets.ingest.tables import replace_table

CONTRACT_COLUMNS = [
    "path", "split", "label", "gbifID", "datasetKey", "publishingOrgKey", "url", "references",
    "license", "license_raw", "rightsHolder", "creator", "sha256", "width", "height", "bytes",
    "fetched_at",
]  # fmt: skip
# Occurrence columns carried along when the manifest has them (search and archive modes differ).
TAXON_COLUMNS = ["scientificName", "species"]
# Which copy of identical bytes is kept: a train copy before val before test, then the lowest
# rank (the seeded order of the manifest), then the path; near-duplicate flags use the same order.
KEEP_ORDER = "CASE split WHEN 'train' THEN 0 WHEN 'val' THEN 1 ELSE 2 END, rank, path"
# Hamming distance (of 64 bits) under which two perceptual hashes count as the same picture.
NEAR_DISTANCE = 8
NO_PARTITIONS = "no_partitions"  # an empty relation shaped like a partition file


@dataclass
class MetadataResult:
    """Figures of the merged metadata (the asset's metadata)."""

    rows: int
    duplicates_removed: int
    near_duplicates: int
    per_split: dict[str, int]
    labels: int
    path: Path
    notes: list[str] = field(default_factory=list)


def _glob(home: Path, folder: str) -> str | None:
    files = sorted((home / "metadata" / folder).glob("*.parquet"))
    return None if not files else "[" + ", ".join(literal(f) for f in files) + "]"


def merged_select(home: Path) -> str:
    """SQL over the partition files joined with the manifest, one row per kept file (reads the
    relation `NO_PARTITIONS` when the manifest selected nothing)."""
    manifest_path = home / "metadata" / "manifest.parquet"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path} not found: materialize `media_manifest` first")
    parts = _glob(home, "partitions")
    if parts is not None:
        kept = f"read_parquet({parts}, union_by_name = true)"
    elif pq.ParquetFile(manifest_path).metadata.num_rows == 0:
        kept = NO_PARTITIONS  # nothing to download: an empty dataset, not a missing step
    else:
        raise FileNotFoundError(f"{home / 'metadata' / 'partitions'} has no Parquet files: materialize `images` first")
    manifest = literal(manifest_path)
    present = set(pq.read_schema(manifest_path).names)
    extra = "".join(f', m."{c}"' for c in TAXON_COLUMNS if c in present)
    previous = home / "metadata" / "images.parquet"
    if not previous.exists():
        return f"""
        SELECT k.path, k.split, k.label, k."gbifID", m."datasetKey", m."publishingOrgKey", k.url,
               m."references", m.license_id AS license, m."license" AS license_raw,
               m."rightsHolder",
               m.creator, k.sha256, k.width, k.height, k.bytes, k.fetched_at,
               k.source, m.license_source, m.title, k.stream, k.rank, k.mime{extra}
        FROM {kept} k
        LEFT JOIN read_parquet({manifest}) m ON m.url_sha1 = k.url_sha1 AND m.label = k.label
    """
    # images whose media left GBIF after a refresh (kept by policy) keep their earlier metadata
    extra_p = "".join(f', coalesce(m."{c}", p."{c}") AS "{c}"' for c in TAXON_COLUMNS if c in present)
    return f"""
        SELECT k.path, k.split, k.label, k."gbifID", coalesce(m."datasetKey", p."datasetKey") AS "datasetKey",
               coalesce(m."publishingOrgKey", p."publishingOrgKey") AS "publishingOrgKey", k.url,
               coalesce(m."references", p."references") AS "references",
               coalesce(m.license_id, p.license) AS license, coalesce(m."license", p.license_raw) AS license_raw,
               coalesce(m."rightsHolder", p."rightsHolder") AS "rightsHolder",
               coalesce(m.creator, p.creator) AS creator, k.sha256, k.width, k.height, k.bytes, k.fetched_at,
               k.source, coalesce(m.license_source, p.license_source) AS license_source,
               coalesce(m.title, p.title) AS title, k.stream, k.rank, k.mime{extra_p}
        FROM {kept} k
        LEFT JOIN read_parquet({manifest}) m ON m.url_sha1 = k.url_sha1 AND m.label = k.label
        LEFT JOIN read_parquet({literal(previous)}) p ON p.path = k.path
    """


def drop_labels_not_in_manifest(home: Path) -> list[str]:
    """A label the manifest no longer has (the recipe dropped its taxon, or the label field
    changed) leaves the dataset: its images, its partition file and its attempt log go, so the
    merged metadata, the files on disk and the reports agree on the classes."""
    manifest = home / "metadata" / "manifest.parquet"
    if not manifest.exists():
        return []
    labels = set(pq.read_table(manifest, columns=["label"]).column("label").to_pylist())
    dropped = []
    for part in sorted((home / "metadata" / "partitions").glob("*.parquet")):
        rows = pq.read_table(part, columns=["label", "path"]).to_pylist()
        if not rows or any(r["label"] in labels for r in rows):
            continue
        folders = set()
        for row in rows:
            (home / row["path"]).unlink(missing_ok=True)
            folders.add((home / row["path"]).parent)
        for folder in folders:
            with contextlib.suppress(OSError):  # not empty: files the merge will report
                folder.rmdir()
        (home / "metadata" / "downloads" / part.name).unlink(missing_ok=True)
        part.unlink()
        dropped.append(str(rows[0]["label"]))
    return dropped


def _write(con: duckdb.DuckDBPyConnection, sql: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    con.execute(f"COPY ({sql}) TO {literal(tmp)} (FORMAT parquet)")
    os.replace(tmp, path)


def merge_image_metadata(home: Path, con: duckdb.DuckDBPyConnection | None = None) -> MetadataResult:
    """Write metadata/images.parquet (and table `images` when a warehouse is given)."""
    warehouse = con  # the caller's DuckDB; the merge itself runs in a private in-memory one
    dropped = drop_labels_not_in_manifest(home)
    con = duckdb.connect()
    try:
        con.register(NO_PARTITIONS, KEPT_SCHEMA.empty_table())
        con.execute(f"CREATE TEMP TABLE merged AS {merged_select(home)}")
        con.execute(
            f"""CREATE TEMP TABLE ranked AS
               SELECT *, row_number() OVER (PARTITION BY sha256
                   ORDER BY {KEEP_ORDER}) AS dup_rank,
                   first_value(path) OVER (PARTITION BY sha256
                   ORDER BY {KEEP_ORDER}) AS keeper
               FROM merged"""
        )
        dups = con.execute("SELECT path FROM ranked WHERE dup_rank > 1").fetchall()
        _write(
            con,
            "SELECT * EXCLUDE (dup_rank, keeper), keeper AS duplicate_of FROM ranked WHERE dup_rank > 1",
            home / "metadata" / "duplicates.parquet",
        )
        for (path,) in dups:
            (home / path).unlink(missing_ok=True)
        con.execute("CREATE TEMP TABLE kept AS SELECT * EXCLUDE (dup_rank, keeper) FROM ranked WHERE dup_rank = 1")
        out = home / "metadata" / "images.parquet"
        near = _near_duplicates(con, home, _known_phashes(out))
        _write(con, "SELECT * FROM kept ORDER BY split, label, path", out)
        per_split = dict(con.execute("SELECT split, count(*) FROM kept GROUP BY split").fetchall())
        rows = sum(per_split.values())
        labels = con.execute("SELECT count(DISTINCT label) FROM kept").fetchone()[0]
    finally:
        con.close()
    if warehouse is not None:
        replace_table(warehouse, "images", f"SELECT * FROM read_parquet({literal(out)})")
    notes = [f"{len(dups)} exact duplicate file(s) removed (listed in metadata/duplicates.parquet)"] if dups else []
    if dropped:
        notes.append(
            f"{len(dropped)} label(s) no longer in the manifest removed with their images: " + ", ".join(dropped[:20])
        )
    if near:
        notes.append(f"{near} near-duplicate image(s) flagged in column near_duplicate_of (perceptual hash)")
    return MetadataResult(
        rows=rows,
        duplicates_removed=len(dups),
        near_duplicates=near,
        per_split=per_split,
        labels=int(labels),
        path=out,
        notes=notes,
    )


def _near_duplicates(con: duckdb.DuckDBPyConnection, home: Path, known: dict[str, int]) -> int:
    """Add columns `phash` (64-bit perceptual hash, hex) and `near_duplicate_of` to table `kept`:
    an image within NEAR_DISTANCE bits of an earlier kept one (a resized or re-encoded copy)
    names it; the first one in train/rank/path order stays unflagged. `known`: hashes by sha256
    from the last merge, so a refresh decodes only the images it has not seen."""
    rows = con.execute(f"SELECT path, sha256 FROM kept ORDER BY {KEEP_ORDER}").fetchall()
    hashes = [known[sha] if sha in known else _phash(home / path) for path, sha in rows]
    flagged = dict(near_duplicate_pairs(hashes, NEAR_DISTANCE))
    paths = [path for path, _ in rows]
    hashed = pa.table({
        "path": pa.array(paths, pa.string()),
        "phash": pa.array([None if key is None else f"{key:016x}" for key in hashes], pa.string()),
        "near_duplicate_of": pa.array([paths[flagged[i]] if i in flagged else None for i in range(len(rows))],
                                      pa.string()),
    })  # fmt: skip
    con.register("hashes", hashed)
    con.execute("CREATE TEMP TABLE hashed AS SELECT * FROM kept JOIN hashes USING (path)")
    con.execute("DROP TABLE kept")
    con.execute("ALTER TABLE hashed RENAME TO kept")
    con.unregister("hashes")
    return len(flagged)


def _phash(path: Path) -> int | None:
    """The image's perceptual hash, or None when it cannot be read here (files_match_metadata
    judges the file)."""
    import imagehash
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.draft("RGB", (64, 64))
            return int(str(imagehash.phash(img)), 16)
    except (OSError, SyntaxError, ValueError):
        return None


def _known_phashes(images: Path) -> dict[str, int]:
    """sha256 -> perceptual hash from an earlier images.parquet (empty if none, or one written
    before the column existed)."""
    try:
        table = pq.read_table(images, columns=["sha256", "phash"])
    except (OSError, ValueError, KeyError, pa.ArrowException):
        return {}
    return {sha: int(key, 16) for sha, key in zip(*table.to_pydict().values(), strict=True) if sha and key}


NEAR_CELLS = 1 << 22  # hash pairs compared at once: a block of new hashes x every unflagged one (32 MB)


def near_duplicate_pairs(hashes: list[int | None], max_distance: int, cells: int = NEAR_CELLS) -> list[tuple[int, int]]:
    """(index, keeper index) for every hash within `max_distance` bits of an earlier unflagged
    one (None: not hashed, skipped); the keeper is the nearest, the earliest on a tie.

    Every hash is compared with every unflagged one before it, as numpy blocks rather than one
    Python pass per image: 20,000 images took 13.6 s one by one (the pass grows with the set),
    and 100,000 would take minutes."""
    import numpy as np

    order = [i for i, key in enumerate(hashes) if key is not None]
    keepers = np.empty(len(order), dtype=np.uint64)  # the unflagged hashes, in order
    keeper_index: list[int] = []
    flagged: list[tuple[int, int]] = []
    at = 0
    while at < len(order):
        block = order[at : at + max(1, min(1024, cells // max(1, len(keeper_index))))]
        at += len(block)
        values = np.array([hashes[i] for i in block], dtype=np.uint64)
        if keeper_index:
            distances = np.bitwise_count(values[:, None] ^ keepers[None, : len(keeper_index)])
            nearest = distances.argmin(axis=1)  # the earliest of the nearest
            nearest_distance = distances[np.arange(len(block)), nearest]
        first_new = len(keeper_index)
        for row, index in enumerate(block):
            best, best_distance = -1, max_distance + 1
            if first_new:
                best, best_distance = int(nearest[row]), int(nearest_distance[row])
            key = hashes[index]
            for k in range(first_new, len(keeper_index)):  # keepers added within this block
                distance = (int(keepers[k]) ^ key).bit_count()
                if distance < best_distance:
                    best, best_distance = k, distance
            if best_distance <= max_distance:
                flagged.append((index, keeper_index[best]))
            else:
                keepers[len(keeper_index)] = key
                keeper_index.append(index)
    return flagged


def check_files_match(home: Path) -> list[str]:
    """Every image file on disk has a row, every row has its file, and the file is the one the row
    describes: as long as the row says, and, when it was written after its fetch (changed in place,
    even at the same size), with the row's sha256."""
    table = home / "metadata" / "images.parquet"
    if not table.exists():
        return [f"{table} does not exist"]
    con = duckdb.connect()
    try:
        rows = {
            path: (size, sha256, fetched)
            for path, size, sha256, fetched in con.execute(
                f"SELECT path, bytes, sha256, epoch(fetched_at) FROM read_parquet({literal(table)})"
            ).fetchall()
        }
    finally:
        con.close()
    files = {
        p.relative_to(home).as_posix(): p.stat()
        for p in (home / "images").rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.name not in ("metadata.jsonl", "metadata.csv")
    }
    problems = [f"file without a row: {p}" for p in sorted(files.keys() - rows.keys())]
    problems += [f"row without a file: {p}" for p in sorted(rows.keys() - files.keys())]
    for path in sorted(files.keys() & rows.keys()):
        size, sha256, fetched = rows[path]
        if size is not None and files[path].st_size != size:
            problems.append(f"file size differs from its row: {path} ({files[path].st_size} bytes, row says {size})")
        elif sha256 and fetched is not None and files[path].st_mtime > fetched + MTIME_SLACK_S:
            with open(home / path, "rb") as handle:
                if hashlib.file_digest(handle, "sha256").hexdigest() != sha256:
                    problems.append(f"file changed since it was fetched: {path} (its sha256 is not the row's)")
    return problems


def merged_images(home: Path) -> Path:
    """metadata/images.parquet, or an error that says which asset writes it."""
    table = home / "metadata" / "images.parquet"
    if not table.exists():
        raise FileNotFoundError(f"{table} not found: materialize `image_metadata` first")
    return table


def check_hash_leakage(home: Path) -> list[str]:
    """The same bytes in two splits would leak test images into training."""
    table = literal(merged_images(home))
    con = duckdb.connect()
    try:
        found = con.execute(
            f"SELECT sha256, string_agg(DISTINCT split, ',' ORDER BY split) "
            f"FROM read_parquet({table}) GROUP BY sha256 HAVING count(DISTINCT split) > 1"
        ).fetchall()
    finally:
        con.close()
    return [f"sha256 {h} is in splits {s}" for h, s in found]


def check_licenses(home: Path, allowed: list[str]) -> list[str]:
    """Rows whose licence the recipe does not allow."""
    table = literal(merged_images(home))
    con = duckdb.connect()
    try:
        rows = con.execute(f"SELECT path, license FROM read_parquet({table})").fetchall()
    finally:
        con.close()
    return [f"{p}: licence {lic} not allowed" for p, lic in rows if lic not in allowed]


def rows_of(home: Path, sql_from_images: str) -> list[dict[str, Any]]:
    """Run a query over metadata/images.parquet (exposed as `images`) and return dict rows."""
    con = duckdb.connect()
    try:
        con.execute(f"CREATE VIEW images AS SELECT * FROM read_parquet({literal(merged_images(home))})")
        cur = con.execute(sql_from_images)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    finally:
        con.close()
