"""Search-mode rows from a real recorded search response (pygbif's test query, taxonKey 2683264)."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from gbif_assets.ingest import load_search_records, required_fields

RECORDED = Path(__file__).resolve().parents[2] / "gbif_assets" / "emulator" / "data" / "recorded"


@pytest.fixture(scope="module")
def records() -> list[dict]:
    exchange = json.loads((RECORDED / "pygbif_test_search_key2.json").read_text())[0]
    return exchange["response"]["body"]["results"]


def test_one_row_per_media_item_and_records_without_media_counted(records: list[dict]) -> None:
    con = duckdb.connect()
    result = load_search_records(con, records, required_fields_for("speciesKey"))
    media = sum(len(r.get("media") or []) for r in records)
    assert (result.occurrences, result.media_rows) == (300, media) == (300, 226)
    assert result.skipped == {"occurrence_without_media": 127}
    assert con.execute("SELECT count(*) FROM occurrences").fetchone()[0] == 226
    keys = con.execute(
        'SELECT count(DISTINCT "gbifID"), min(media_index), max(media_index) FROM occurrences'
    ).fetchone()
    assert keys[0] == 300 - 127 and keys[1] == 0 and keys[2] >= 1


def test_media_licence_and_occurrence_licence_are_both_kept_raw(records: list[dict]) -> None:
    con = duckdb.connect()
    load_search_records(con, records, required_fields_for("speciesKey"))
    first = next(r for r in records if r.get("media"))
    row = con.execute(
        'SELECT identifier, "license", occurrence_license, creator, "speciesKey", "datasetKey", "decimalLatitude"'
        ' FROM occurrences WHERE "gbifID" = ? AND media_index = 0',
        [str(first["gbifID"])],
    ).fetchone()
    media = first["media"][0]
    assert row[:4] == (media["identifier"], media["license"], first["license"], media.get("creator"))
    assert row[4] == str(first["speciesKey"]) and row[5] == first["datasetKey"]
    assert row[6] == pytest.approx(first["decimalLatitude"])


def test_key_stands_in_for_a_missing_gbif_id(records: list[dict]) -> None:
    record = {k: v for k, v in next(r for r in records if r.get("media")).items() if k != "gbifID"}
    con = duckdb.connect()
    load_search_records(con, [record], required_fields_for("speciesKey"))
    assert {r[0] for r in con.execute('SELECT "gbifID" FROM occurrences').fetchall()} == {str(record["key"])}


def test_a_non_numeric_coordinate_is_null_not_a_failed_load(records: list[dict]) -> None:
    bad = {"key": 1, "media": [{"identifier": "https://x/y.jpg"}], "decimalLatitude": "north", "speciesKey": 5}
    con = duckdb.connect()
    load_search_records(con, [*records[:5], bad], required_fields_for("speciesKey"))
    row = con.execute('SELECT "decimalLatitude", "speciesKey" FROM occurrences WHERE "gbifID" = \'1\'').fetchone()
    assert row == (None, "5")


def required_fields_for(label: str) -> list[str]:
    from gbif_assets.recipe import parse_recipe

    recipe = parse_recipe(
        {"name": "t", "label": label, "source": {"mode": "search", "query": {"taxonKey": [2683264]}}}, "t"
    )
    return required_fields(recipe)
