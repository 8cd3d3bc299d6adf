"""DwC-A ingest: real archives, both multimedia layouts, and every kind of broken input."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import duckdb
import pytest

from gbif_assets.emulator.archives import build_archive
from gbif_assets.emulator.pool import load_recorded_records
from gbif_assets.ingest import ArchiveError, load_archive

DATA = Path(__file__).parent / "data"
REAL_2014 = DATA / "dwca-0000066-140928181241064.zip"
FIELDS = ["year"]


@pytest.fixture
def con() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("CREATE TABLE occurrences AS SELECT 'previous' AS marker")
    return con


def _previous_intact(con: duckdb.DuckDBPyConnection) -> None:
    assert con.execute("SELECT marker FROM occurrences").fetchall() == [("previous",)]


def test_real_2014_archive(con: duckdb.DuckDBPyConnection) -> None:
    result = load_archive(REAL_2014, con, FIELDS)
    assert (result.format, result.occurrences, result.media_rows, result.rows_loaded) == (
        "DWCA",
        470,
        215,
        215,
    )
    rows = con.execute(
        'SELECT count(*) FILTER (WHERE "type" = \'StillImage\'), count(*) FILTER (WHERE "type" IS NULL), '
        "count(DISTINCT gbifID), count(*) FILTER (WHERE identifier LIKE 'http%') FROM occurrences"
    ).fetchone()
    assert rows == (210, 5, 214, 210)  # 210 StillImage; the 5 rows without type have no URL either
    assert "publishingOrgKey" in result.missing_columns  # not in 2014 archives: said plainly
    sample = con.execute("SELECT datasetKey, year FROM occurrences WHERE gbifID = '657664467'").fetchone()
    assert sample == ("aae308f4-9f9c-4cdd-b4ef-c026f48be551", "1964")


@pytest.mark.parametrize("layout", ["current", "2014"])
def test_both_multimedia_layouts_load_the_same(tmp_path: Path, layout: str) -> None:
    records = load_recorded_records()[:120]
    path = (
        build_archive(
            tmp_path / "a.zip",
            "0000001-000000000000000",
            "10.15468/dl.test",
            records,
            media_layout=layout,
        )
        and tmp_path / "a.zip"
    )
    con = duckdb.connect()
    result = load_archive(path, con, FIELDS)
    media = sum(len(r.get("media", [])) for r in records)
    assert result.rows_loaded == media
    first = next(r for r in records if r.get("media"))
    row = con.execute(
        'SELECT identifier, "license", creator, "references" FROM occurrences WHERE gbifID = ? ORDER BY media_index',
        [first["gbifID"]],
    ).fetchall()
    assert {r[0] for r in row} == {m["identifier"] for m in first["media"]}
    assert {r[1] for r in row} == {m.get("license") for m in first["media"]}


def _rewrite(src: Path, dest: Path, drop: set[str] = frozenset(), replace: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            if item.filename in drop:
                continue
            data = (replace or {}).get(item.filename, zin.read(item.filename))
            zout.writestr(item.filename, data)
    return dest


def test_truncated_zip(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    bad = tmp_path / "cut.zip"
    bad.write_bytes(REAL_2014.read_bytes()[:50_000])
    with pytest.raises(ArchiveError, match=r"cut\.zip: not a readable zip, probably truncated"):
        load_archive(bad, con, FIELDS)
    _previous_intact(con)


def test_missing_meta_xml(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    bad = _rewrite(REAL_2014, tmp_path / "nometa.zip", drop={"meta.xml"})
    with pytest.raises(ArchiveError, match=r"no meta\.xml"):
        load_archive(bad, con, FIELDS)
    _previous_intact(con)


@pytest.mark.parametrize("member", ["occurrence.txt", "multimedia.txt"])
def test_file_named_in_meta_but_absent(con: duckdb.DuckDBPyConnection, tmp_path: Path, member: str) -> None:
    bad = _rewrite(REAL_2014, tmp_path / "missing.zip", drop={member})
    with pytest.raises(ArchiveError, match=f"meta.xml names {member}, but the archive has no such file"):
        load_archive(bad, con, FIELDS)
    _previous_intact(con)


def test_rows_with_wrong_field_counts_and_bad_utf8_are_counted(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    with zipfile.ZipFile(REAL_2014) as z:
        media = z.read("multimedia.txt").split(b"\n")
    header, rows = media[0], [r for r in media[1:] if r]
    broken = [
        header,
        *rows,
        b"1\tStillImage\timage/jpeg",
        b"\t".join([b"2"] * 20),
        b"657664467\tStillImage\timage/jpeg\thttp://x.org/\xff\xfe.jpg" + b"\t" * 11,
    ]
    bad = _rewrite(REAL_2014, tmp_path / "rows.zip", replace={"multimedia.txt": b"\n".join(broken) + b"\n"})
    result = load_archive(bad, con, FIELDS)
    assert result.rows_loaded == 215
    assert result.skipped.get("media_too_few_fields") == 1
    assert result.skipped.get("media_too_many_fields") == 1
    assert result.skipped.get("media_not_utf8") == 1
    assert any("skipped rows" in n for n in result.notes)


def test_empty_archive(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w"):
        pass
    with pytest.raises(ArchiveError, match="the archive is empty"):
        load_archive(empty, con, FIELDS)
    _previous_intact(con)


def test_empty_core_file(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    bad = _rewrite(REAL_2014, tmp_path / "emptycore.zip", replace={"occurrence.txt": b""})
    with pytest.raises(ArchiveError, match=r"occurrence\.txt is empty"):
        load_archive(bad, con, FIELDS)
    _previous_intact(con)


def test_archive_without_multimedia_says_so(tmp_path: Path) -> None:
    path = tmp_path / "nomedia.zip"
    build_archive(
        path,
        "0000002-000000000000000",
        "10.15468/dl.x",
        load_recorded_records()[:10],
        with_multimedia=False,
    )
    con = duckdb.connect()
    result = load_archive(path, con, FIELDS)
    assert result.rows_loaded == 0 and result.occurrences == 10
    assert any("no multimedia.txt" in n for n in result.notes)


@pytest.mark.parametrize("name", ["simple-csv-0009886-250127130748423.zip", "simple-csv-0011066-200127171203522.zip"])
def test_simple_csv_has_no_media(tmp_path: Path, name: str) -> None:
    src = Path(__file__).parents[2] / "gbif_assets" / "emulator" / "data" / "archives" / name
    shutil.copy(src, tmp_path / name)
    con = duckdb.connect()
    result = load_archive(tmp_path / name, con, FIELDS)
    assert result.format == "SIMPLE_CSV" and result.rows_loaded == 0 and result.occurrences > 0
    assert "carry no media links" in result.notes[0]
    assert con.execute("SELECT count(*) FROM occurrences").fetchone()[0] == 0


def test_failure_mid_load_keeps_previous_table(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    with zipfile.ZipFile(REAL_2014) as z:
        meta = z.read("meta.xml").replace(b'encoding="UTF-8"', b'encoding="ISO-8859-1"', 1)
    bad = _rewrite(REAL_2014, tmp_path / "latin.zip", replace={"meta.xml": meta})
    with pytest.raises(ArchiveError, match="GBIF archives are UTF-8"):
        load_archive(bad, con, FIELDS)
    _previous_intact(con)
