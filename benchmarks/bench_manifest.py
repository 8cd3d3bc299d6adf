"""Manifest benchmark: `media_manifest` over an `occurrences` table of 8,000,000 media rows.

    python benchmarks/bench_manifest.py [--rows 8000000]

The table is generated with DuckDB SQL (about 100 labels, 40 datasets, 97 hosts, mixed licence
strings as publishers write them). build_manifest runs in a child process so its wall time and
peak RSS are its own; the time includes writing the Parquet manifest (the asset's whole work
but the class-distribution plot). Target (issue 4): at most 30 s and 2 GB on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "manifest"


def generate(db: Path, rows: int) -> None:
    if db.exists():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(db))
    con.execute("SET threads = 2")
    con.execute(
        f"""CREATE TABLE occurrences AS SELECT
            CAST(i // 2 AS VARCHAR) AS "gbifID", CAST(i % 2 AS INTEGER) AS media_index,
            'StillImage' AS "type", 'image/jpeg' AS "format",
            'https://img' || (i % 97) || '.example.org/photos/' || i || '/original.jpg' AS identifier,
            'https://example.org/p/' || i AS "references", NULL::VARCHAR AS title, NULL::VARCHAR AS description,
            NULL::VARCHAR AS source, NULL::VARCHAR AS audience, '2021-06-01' AS created,
            'Observer ' || (i % 5000) AS creator, NULL::VARCHAR AS contributor, 'iNaturalist' AS publisher,
            CASE i % 7 WHEN 0 THEN 'http://creativecommons.org/licenses/by-nc/4.0/'
                       WHEN 1 THEN 'http://creativecommons.org/licenses/by/4.0/'
                       WHEN 2 THEN 'CC BY-NC 4.0' WHEN 3 THEN 'All rights reserved'
                       WHEN 4 THEN 'http://creativecommons.org/publicdomain/zero/1.0/'
                       WHEN 5 THEN 'https://creativecommons.org/licenses/by-sa/4.0/legalcode'
                       ELSE NULL END AS "license",
            'Observer ' || (i % 5000) AS "rightsHolder", 'CC_BY_4_0' AS occurrence_license,
            'd' || (i % 40) AS "datasetKey", 'p' || (i % 12) AS "publishingOrgKey", 'HUMAN_OBSERVATION' AS "basisOfRecord",
            '6' AS "kingdomKey", '7707728' AS "phylumKey", '220' AS "classKey", '1' AS "orderKey", '2' AS "familyKey",
            CAST(20000 + (i // 2) % 30 AS VARCHAR) AS "genusKey", CAST(500000 + hash(i // 2) % 100 AS VARCHAR) AS "speciesKey",
            CAST(500000 + hash(i // 2) % 100 AS VARCHAR) AS "taxonKey", NULL::VARCHAR AS "acceptedTaxonKey",
            'Species' AS "scientificName", 'Species' AS species, 'FR' AS "countryCode", '2021-06-01' AS "eventDate",
            45.0 AS "decimalLatitude", 3.0 AS "decimalLongitude"
        FROM range({rows}) t(i)"""
    )
    con.close()


RECIPE = """
name: bench
label: speciesKey
source: {mode: existing, key: 0000000-000000000000000}
filters: {licenses: [CC0-1.0, CC-BY-4.0, CC-BY-NC-4.0, CC-BY-SA-4.0]}
balance: {split_streams_by: [datasetKey, speciesKey], nb_samples_per_stream: 800, seed: 0}
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8_000_000)
    args = parser.parse_args()
    db = WORK / f"occurrences-{args.rows}.duckdb"
    started = time.monotonic()
    generate(db, args.rows)
    print(f"occurrences table of {args.rows:,} rows ready ({time.monotonic() - started:.0f} s)")
    code = (
        "import duckdb, json, pathlib, time, yaml\n"
        "from gbif_assets.recipe import parse_recipe\nfrom gbif_assets.manifest import build_manifest\n"
        f"recipe = parse_recipe(yaml.safe_load({RECIPE!r}), 'bench')\n"
        f"con = duckdb.connect({str(db)!r}); con.execute('SET threads = 2'); con.execute(\"SET memory_limit = '1500MB'\")\n"
        f"out = pathlib.Path({str(WORK / 'manifest.parquet')!r})\n"
        "t = time.monotonic(); r = build_manifest(con, recipe, out); s = time.monotonic() - t\n"
        "print(json.dumps({'seconds': round(s, 1), 'rows': r.rows, 'selected': r.selected, 'streams': r.streams, 'labels': len(r.labels)}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    print(
        f"build_manifest: {args.rows:,} rows -> {result['rows']:,} candidates, {result['selected']:,} selected in "
        f"{result['streams']} streams / {result['labels']} labels: {result['seconds']} s, peak RSS {result['peak_rss_mb']} MB"
    )
    (WORK / "manifest.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
