"""Licence report and attribution lines."""

from __future__ import annotations

import csv
from pathlib import Path

from gbif_assets.reports.licenses import attribution, license_report


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_counts_per_licence_holder_and_publisher(merged: Path) -> None:
    report = license_report(merged)
    assert report.rows == 9
    assert {r["license"]: r["images"] for r in report.per_license} == {
        "CC-BY-4.0": 6,
        "CC0-1.0": 2,
        "CC-BY-NC-4.0": 1,
    }
    assert report.per_license[0]["url"] == "https://creativecommons.org/licenses/by/4.0/"
    assert {r["rights_holder"]: r["images"] for r in report.per_rights_holder} == {
        "Ann Observer": 8,
        "Museum B": 1,
    }
    assert sum(r["images"] for r in report.per_publisher) == 9
    on_disk = _csv(merged / "reports" / "licenses.csv")
    assert {r["license"]: int(r["images"]) for r in on_disk} == {
        "CC-BY-4.0": 6,
        "CC0-1.0": 2,
        "CC-BY-NC-4.0": 1,
    }
    assert len(_csv(merged / "reports" / "publishers.csv")) == 2
    holders = _csv(merged / "reports" / "rights_holders.csv")
    assert len(holders) == 2
    for row in holders:  # sorted, so that two builds of the same images write the same file
        assert row["licenses"].split(", ") == sorted(row["licenses"].split(", "))
    assert "CC-BY-4.0, CC-BY-NC-4.0, CC0-1.0" in {r["licenses"] for r in holders}
    md = (merged / "reports" / "licenses.md").read_text(encoding="utf-8")
    assert "| CC-BY-NC-4.0 | 1 |" in md and md == report.report_md
    assert report.warnings == [
        "restrictive licences present: CC-BY-NC-4.0 (1 images) - NC forbids commercial use, "
        "ND forbids adapted copies, unknown means ask the rights holder"
    ]
    assert not list((merged / "reports").glob("*.tmp"))


def test_no_warning_when_all_licences_are_open(merged: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = merged / "metadata" / "images.parquet"
    rows = [dict(r, license="CC-BY-4.0") for r in pq.read_table(table).to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows), table)
    assert license_report(merged).warnings == []


def test_unknown_and_nd_licences_warn(merged: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = merged / "metadata" / "images.parquet"
    rows = pq.read_table(table).to_pylist()
    rows[0]["license"], rows[1]["license"] = "unknown", "CC-BY-ND-4.0"
    pq.write_table(pa.Table.from_pylist(rows), table)
    warning = license_report(merged).warnings[0]
    assert "unknown (1 images)" in warning and "CC-BY-ND-4.0 (1 images)" in warning


def test_attribution_has_one_line_per_image(merged: Path) -> None:
    result = attribution(merged)
    lines = _csv(result.path)
    assert result.rows == len(lines) == 9
    assert result.path == merged / "reports" / "attribution.csv"
    by_occ = {line["occurrence_url"].rsplit("/", 1)[1]: line for line in lines}
    assert by_occ["1"]["title"] == "Fern 1"
    assert by_occ["2"]["title"] == "GBIF occurrence 2"
    # No creator: the rights holder is credited instead.
    assert by_occ["3"]["creator"] == "Museum B"
    assert by_occ["3"]["license_url"] == "https://creativecommons.org/publicdomain/zero/1.0/"
    assert by_occ["7"]["license_url"] == "https://creativecommons.org/licenses/by-nc/4.0/"
    assert by_occ["7"]["source_url"] == "https://observations.example/7"
    assert all(line["path"].startswith("images/") for line in lines)
    assert result.missing_creator == 0 and result.warnings == []


def test_missing_licence_counts_as_unknown(merged: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = merged / "metadata" / "images.parquet"
    rows = pq.read_table(table).to_pylist()
    rows[0]["license"] = None
    pq.write_table(pa.Table.from_pylist(rows), table)
    report = license_report(merged)
    assert {r["license"]: r["images"] for r in report.per_license}["unknown"] == 1
    assert "unknown (1 images)" in report.warnings[0]
