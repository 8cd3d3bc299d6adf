"""Link-rot report from the attempt logs (Pitblado and Cronk, Table 1)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import DS_A, DS_B, ORG_A, ORG_B
from PIL import Image

from gbif_assets.reports.linkrot import link_rot_report


def test_valid_invalid_and_rescued_links(home: Path) -> None:
    report = link_rot_report(home)
    # 12 links: 9 served by the publisher, 1 only by GBIF's cache (404), 2 dead everywhere.
    assert (report.links_tried, report.valid, report.rescued_by_gbif_cache, report.invalid) == (
        12,
        9,
        1,
        2,
    )
    assert report.link_rot_percent == 25.0
    assert report.warnings == ["25.0% of tried links are dead at the publisher"]
    per_label = {
        r["label"]: (r["valid"], r["invalid"], r["rescued_by_gbif_cache"], r["link_rot_percent"])
        for r in report.per_label
    }
    assert per_label == {"1001": (6, 0, 0, 0.0), "2002": (3, 3, 1, 50.0)}
    per_host = {r["host"]: (r["valid"], r["invalid"], r["link_rot_percent"]) for r in report.per_host}
    assert per_host == {"img.a.example": (5, 1, 16.7), "media.b.example": (4, 2, 33.3)}
    per_pub = {(r["datasetKey"], r["publishingOrgKey"]): (r["valid"], r["invalid"]) for r in report.per_publisher}
    assert per_pub == {(DS_A, ORG_A): (5, 1), (DS_B, ORG_B): (4, 2)}
    per_error = {(r["error_class"], r["status"]): r["links"] for r in report.per_error}
    # The last publisher attempt decides the class (gbifID 11 timed out twice: one link).
    assert per_error == {("HTTPStatus", 404): 1, ("HTTPStatus", 403): 1, ("Timeout", None): 1}


def test_files_written(home: Path) -> None:
    report = link_rot_report(home)
    reports = home / "reports"
    with (reports / "link_rot_by_label.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["label"], r["valid"], r["invalid"], r["link_rot_percent"]) for r in rows] == [
        ("2002", "3", "3", "50.0"),
        ("1001", "6", "0", "0.0"),
    ]
    with (reports / "link_rot_by_publisher.csv").open(encoding="utf-8") as handle:
        pubs = list(csv.DictReader(handle))
    assert {p["datasetKey"] for p in pubs} == {DS_A, DS_B} and all(p["publishingOrgKey"] for p in pubs)
    for name in ("link_rot_by_host.csv", "link_rot_by_error.csv"):
        assert (reports / name).stat().st_size > 0
    md = (reports / "link_rot.md").read_text(encoding="utf-8")
    assert md == report.report_md
    assert "12 links tried: 9 valid, 3 invalid at the publisher (25.0%), of which 1 rescued" in md
    assert report.plot == reports / "link_rot.png"
    with Image.open(report.plot) as img:
        assert img.format == "PNG" and img.width > 300


def test_no_attempt_logs_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no attempt logs: materialize `images` first"):
        link_rot_report(tmp_path)
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize(
    ("error", "said"),
    [
        ("host_paused", "4 more link(s) not asked for: their host wanted a longer pause than a run waits."),
        ("blocked", "4 link(s) refused by this client, not judged: their address is private or loopback"),
    ],
)
def test_links_the_publisher_was_never_asked_for_are_not_judged(home: Path, error: str, said: str) -> None:
    """A host that said "Retry-After: one day" had its other links skipped (`host_paused`), and
    this client refuses private addresses (`blocked`): those links were never requested, so they
    are neither valid nor dead at the publisher; a dead host's skipped links (`circuit_open`)
    still count as dead."""
    urls = [f"https://img.a.example/never/{i}.jpg" for i in range(4)]
    # the cache served one: still unjudged
    _add_links(home, urls, error, then={"url": urls[0], "error": None, "source": "gbif_cache", "ms": 5})
    report = link_rot_report(home)
    assert (report.links_tried, report.invalid) == (12, 2)
    assert said in report.report_md


def test_links_no_longer_in_the_manifest_are_history_not_rot(home: Path) -> None:
    """A refresh that narrowed the recipe leaves the attempts of links it dropped in the logs:
    they are not this dataset's links, and no row without a label or host appears."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    log = home / "metadata" / "downloads" / "1001.parquet"
    rows = pq.read_table(log).to_pylist()
    dropped = [{**rows[0], "url": f"https://img.a.example/dropped/{i}.jpg", "error": "http_404"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows + dropped), log)
    report = link_rot_report(home)
    assert (report.links_tried, report.invalid) == (12, 2)
    assert all(r["label"] for r in report.per_label) and all(r["host"] for r in report.per_host)


def test_a_link_that_served_an_image_of_an_unwanted_format_is_valid(home: Path) -> None:
    """The publisher served a PNG where the recipe keeps JPEG only: the link works, it is not rot."""
    _add_links(home, [f"https://img.a.example/png/{i}.png" for i in range(3)], "unwanted_format")
    report = link_rot_report(home)
    assert (report.links_tried, report.valid, report.invalid) == (15, 12, 2)


def _add_links(home: Path, urls: list[str], error: str, then: dict | None = None) -> None:
    """Label 1001's candidates gain `urls`, each tried once and failed with `error` (then one
    more attempt row, `then`, when given)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    log = home / "metadata" / "downloads" / "1001.parquet"
    rows = pq.read_table(log).to_pylist()
    extra = [{**rows[0], "url": url, "error": error, "ms": 0} for url in urls] + ([{**rows[0], **then}] if then else [])
    pq.write_table(pa.Table.from_pylist(rows + extra), log)
    manifest = home / "metadata" / "manifest.parquet"
    candidates = pq.read_table(manifest).to_pylist()
    pq.write_table(pa.Table.from_pylist(candidates + [{**candidates[0], "identifier": url} for url in urls]), manifest)
