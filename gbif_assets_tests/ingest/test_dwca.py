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
from gbif_assets_tests.conftest import corrupt_member

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


def test_a_corrupt_member_is_named_with_what_to_do(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    bad = corrupt_member(REAL_2014, tmp_path / "rot.zip", "multimedia.txt")
    with pytest.raises(ArchiveError, match=r"rot\.zip: multimedia\.txt is corrupt .*delete the archive and run again"):
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


def test_simple_parquet_in_gbif_part_folder_layout_has_no_media(tmp_path: Path) -> None:
    """GBIF's SIMPLE_PARQUET zip holds `occurrence.parquet/000000`, `000001`...: parts without an
    extension in a folder named .parquet (here written from the real SIMPLE_CSV's rows)."""
    src = Path(__file__).parents[2] / "gbif_assets" / "emulator" / "data" / "archives"
    with zipfile.ZipFile(src / "simple-csv-0009886-250127130748423.zip") as archive:
        member = next(n for n in archive.namelist() if n.endswith(".csv"))
        (tmp_path / "occ.csv").write_bytes(archive.read(member))
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT count(*) FROM read_csv('{tmp_path / 'occ.csv'}', delim='\t', quote='', header=true, all_varchar=true)"
    ).fetchone()[0]
    zip_path = tmp_path / "0000008-000000000000001.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        for part, (offset, limit) in enumerate([(0, rows // 2), (rows // 2, rows)]):
            out = tmp_path / f"part{part}"
            con.execute(
                f"COPY (SELECT * FROM read_csv('{tmp_path / 'occ.csv'}', delim='\t', quote='', header=true, "
                f"all_varchar=true) LIMIT {limit - offset} OFFSET {offset}) TO '{out}' (FORMAT parquet)"
            )
            archive.write(out, f"occurrence.parquet/{part:06d}")
    result = load_archive(zip_path, con, FIELDS)
    assert result.format == "SIMPLE_PARQUET" and result.occurrences == rows > 0 and result.rows_loaded == 0
    assert "carry no media links" in result.notes[0]


AC_EXTENSION = """  <extension encoding="UTF-8" fieldsTerminatedBy="\\t" linesTerminatedBy="\\n" fieldsEnclosedBy=""
      ignoreHeaderLines="1" rowType="http://rs.tdwg.org/ac/terms/Multimedia">
    <files><location>ac_multimedia.txt</location></files>
    <coreid index="0" />
    <field index="1" term="http://purl.org/dc/terms/type"/>
    <field index="2" term="http://rs.tdwg.org/ac/terms/accessURI"/>
    <field index="3" term="http://ns.adobe.com/xap/1.0/rights/WebStatement"/>
    <field index="4" term="http://ns.adobe.com/xap/1.0/rights/Owner"/>
    <field index="5" term="http://rs.tdwg.org/ac/terms/furtherInformationURL"/>
    <field term="http://purl.org/dc/terms/format" default="image/jpeg"/>
  </extension>
</archive>"""


@pytest.mark.parametrize("gbif_media", ["absent", "header only"])
def test_media_only_in_an_audubon_core_extension_are_read(tmp_path: Path, gbif_media: str) -> None:
    """Audubon Core (ac:accessURI, xmpRights:WebStatement...) is how many publishers describe
    media; GBIF interprets it into multimedia.txt, but an archive without that (or with it empty)
    still has the links: they are read from the extension, and the notes say so."""
    with zipfile.ZipFile(REAL_2014) as archive:
        meta = archive.read("meta.xml").decode()
        rows = [line.split("\t") for line in archive.read("multimedia.txt").decode().splitlines()[1:]]
    start = meta.index(
        '  <extension encoding="UTF-8" fieldsTerminatedBy="\\t" linesTerminatedBy="\\n" '
        'fieldsEnclosedBy="" ignoreHeaderLines="1" rowType="http://rs.gbif.org/terms/1.0/Multimedia">'
    )
    if gbif_media == "absent":
        meta = meta[:start] + AC_EXTENSION
    else:
        meta = meta.replace("</archive>", AC_EXTENSION.split("</archive>")[0] + "</archive>")
    lines = ["coreid\ttype\taccessURI\tWebStatement\tOwner\tfurtherInformationURL"]
    lines += [f"{r[0]}\t{r[1]}\t{r[3]}\thttp://creativecommons.org/licenses/by/4.0/\tKU\t{r[4]}" for r in rows]
    replace = {"meta.xml": meta.encode(), "ac_multimedia.txt": "\n".join(lines).encode() + b"\n"}
    if gbif_media == "header only":
        replace["multimedia.txt"] = (
            b"gbifID\ttype\tformat\tidentifier\treferences\ttitle\tdescription\tcreated\t"
            b"creator\tcontributor\tpublisher\taudience\tsource\tlicense\trightsHolder\n"
        )
    path = _rewrite(REAL_2014, tmp_path / "ac.zip", replace=replace)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("ac_multimedia.txt", replace["ac_multimedia.txt"])
    con = duckdb.connect()
    result = load_archive(path, con, FIELDS)
    assert result.media_rows == len(rows) == 215
    assert any("Audubon Core extension ac_multimedia.txt" in note for note in result.notes)
    loaded = con.execute(
        'SELECT count(*), count(DISTINCT identifier), min(license), min("rightsHolder"), min(format) FROM occurrences'
    ).fetchone()
    links = len({r[3] for r in rows if r[3]})
    assert loaded == (result.rows_loaded, links, "http://creativecommons.org/licenses/by/4.0/", "KU", "image/jpeg")
    expected = {(r[0], r[3] or None) for r in rows}
    assert set(con.execute("SELECT gbifID, identifier FROM occurrences").fetchall()) <= expected


def test_spaces_around_a_media_link_are_not_part_of_it(tmp_path: Path) -> None:
    with zipfile.ZipFile(REAL_2014) as archive:
        lines = archive.read("multimedia.txt").decode().splitlines()
    cells = [line.split("\t") for line in lines]
    for row in cells[1:20]:
        row[3] = f"  {row[3]} \t".rstrip("\t") if row[3] else row[3]
    text = "\n".join("\t".join(row) for row in cells) + "\n"
    path = _rewrite(REAL_2014, tmp_path / "spaces.zip", replace={"multimedia.txt": text.encode()})
    con = duckdb.connect()
    load_archive(path, con, FIELDS)
    links = [r[0] for r in con.execute("SELECT identifier FROM occurrences WHERE identifier IS NOT NULL").fetchall()]
    assert links and all(link == link.strip() and link.startswith("http") for link in links)


def test_failure_mid_load_keeps_previous_table(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    with zipfile.ZipFile(REAL_2014) as z:
        meta = z.read("meta.xml").replace(b'encoding="UTF-8"', b'encoding="ISO-8859-1"', 1)
    bad = _rewrite(REAL_2014, tmp_path / "latin.zip", replace={"meta.xml": meta})
    with pytest.raises(ArchiveError, match="GBIF archives are UTF-8"):
        load_archive(bad, con, FIELDS)
    _previous_intact(con)


# Hand-built archives in the layouts the DwC text guide allows beyond GBIF's own: what the guide
# says, the reader must read, with nothing dropped or shifted.
DC, DWC, GBIF_TERMS = "http://purl.org/dc/terms/", "http://rs.tdwg.org/dwc/terms/", "http://rs.gbif.org/terms/1.0/"
CORE = [(1, "CC_BY_4_0", "ds1", "Aus bus, L."), (2, "CC0_1_0", "ds2", "Cus dus")]
MEDIA = [(1, "http://h.example/1.jpg", "CC-BY"), (2, "http://h.example/2.jpg", "")]


def _meta(core: str = "", media: str = "", attrs: str | None = None, id_index: int = 0) -> str:
    attrs = 'fieldsTerminatedBy="\\t" fieldsEnclosedBy="" ignoreHeaderLines="1"' if attrs is None else attrs
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<archive xmlns="http://rs.tdwg.org/dwc/text/">
  <core {attrs} rowType="{DWC}Occurrence">
    <files><location>occurrence.txt</location></files>
    <id index="{id_index}"/>
    {
        core
        or f'<field index="{id_index}" term="{GBIF_TERMS}gbifID"/>'
        f'<field index="{1 - id_index}" term="{DC}license"/>'
        f'<field index="2" term="{GBIF_TERMS}datasetKey"/><field index="3" term="{DWC}scientificName"/>'
    }
  </core>
  <extension {attrs} rowType="{GBIF_TERMS}Multimedia">
    <files><location>multimedia.txt</location></files>
    <coreid index="0"/>
    {media or f'<field index="1" term="{DC}identifier"/><field index="2" term="{DC}license"/>'}
  </extension>
</archive>"""


def _table(rows: list[tuple], sep: str = "\t", header: str | None = "h") -> str:
    lines = [sep.join(f"h{i}" for i in range(len(rows[0])))] if header else []
    return "\n".join([*lines, *(sep.join(map(str, r)) for r in rows)]) + "\n"


def _zip(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in members.items():
            z.writestr(name, text)
    return path


def _loaded(path: Path) -> list[tuple]:
    con = duckdb.connect()
    load_archive(path, con, [])
    return con.execute(
        'SELECT gbifID, identifier, "license", occurrence_license, datasetKey, scientificName, rightsHolder '
        "FROM occurrences ORDER BY gbifID"
    ).fetchall()


EXPECTED = [
    ("1", "http://h.example/1.jpg", "CC-BY", "CC_BY_4_0", "ds1", "Aus bus, L.", None),
    ("2", "http://h.example/2.jpg", None, "CC0_1_0", "ds2", "Cus dus", None),
]


def test_core_id_in_another_column(tmp_path: Path) -> None:
    """`<id index="1"/>`: the join key is column 1 (an <id/> element has no children, which
    once made the reader fall back to column 0 and drop every media row)."""
    core = [(lic, gid, ds, name) for gid, lic, ds, name in CORE]
    path = _zip(tmp_path / "a.zip", {"meta.xml": _meta(id_index=1), "occurrence.txt": _table(core),
                                     "multimedia.txt": _table(MEDIA)})  # fmt: skip
    assert _loaded(path) == EXPECTED


def test_same_file_name_in_two_folders(tmp_path: Path) -> None:
    """Core and extension both named data.txt, in different folders: each is read as itself."""
    meta = _meta().replace("<location>occurrence.txt", "<location>occurrence/data.txt")
    meta = meta.replace("<location>multimedia.txt", "<location>multimedia/data.txt")
    path = _zip(tmp_path / "a.zip", {"meta.xml": meta, "occurrence/data.txt": _table(CORE),
                                     "multimedia/data.txt": _table(MEDIA)})  # fmt: skip
    for _ in range(3):  # the extension is inflated on a thread while the core is read
        assert _loaded(path) == EXPECTED


def test_field_defaults(tmp_path: Path) -> None:
    """`<field term=... default=...>`: a constant column when it has no index, the value of empty
    cells when it has one. A licence given this way is not lost."""
    media = (
        f'<field index="1" term="{DC}identifier"/><field index="2" term="{DC}license" default="CC0"/>'
        f'<field term="{DC}rightsHolder" default="Museum O\'Hara"/>'
    )
    path = _zip(tmp_path / "a.zip", {"meta.xml": _meta(media=media), "occurrence.txt": _table(CORE),
                                     "multimedia.txt": _table(MEDIA)})  # fmt: skip
    rows = _loaded(path)
    assert [(r[2], r[6]) for r in rows] == [("CC-BY", "Museum O'Hara"), ("CC0", "Museum O'Hara")]


def test_text_guide_defaults_comma_and_double_quotes(tmp_path: Path) -> None:
    """No dialect attributes: the guide's defaults are a comma, double quotes and no header."""
    quoted = [(gid, lic, ds, f'"{name}"') for gid, lic, ds, name in CORE]
    path = _zip(tmp_path / "a.zip", {"meta.xml": _meta(attrs=""), "occurrence.txt": _table(quoted, ",", None),
                                     "multimedia.txt": _table(MEDIA, ",", None)})  # fmt: skip
    assert _loaded(path) == EXPECTED


def test_several_locations_and_two_header_lines(tmp_path: Path) -> None:
    """A file split over two <location>s is read whole; ignoreHeaderLines="2" skips both lines."""
    meta = _meta(attrs='fieldsTerminatedBy="\\t" fieldsEnclosedBy="" ignoreHeaderLines="2"')
    meta = meta.replace("<location>occurrence.txt</location>", "<location>o1.txt</location><location>o2.txt</location>")
    title = "a title line\n"
    o1, o2 = title + _table(CORE[:1]), title + _table(CORE[1:])
    path = _zip(tmp_path / "a.zip", {"meta.xml": meta, "o1.txt": o1,
                                     "o2.txt": o2, "multimedia.txt": title + _table(MEDIA)})  # fmt: skip
    assert _loaded(path) == EXPECTED


def test_rejects_are_counted_per_file(tmp_path: Path) -> None:
    """Bad core rows are counted against the core only (they once showed up as media rejects too)."""
    core = _table(CORE) + "3\tCC0_1_0\tds3\tEus\textra\n"
    path = _zip(tmp_path / "a.zip", {"meta.xml": _meta(), "occurrence.txt": core, "multimedia.txt": _table(MEDIA)})
    result = load_archive(path, duckdb.connect(), [])
    assert result.skipped == {"occurrence_too_many_fields": 1}


def test_empty_multimedia_file_means_no_media(tmp_path: Path) -> None:
    path = _zip(tmp_path / "a.zip", {"meta.xml": _meta(), "occurrence.txt": _table(CORE), "multimedia.txt": ""})
    result = load_archive(path, duckdb.connect(), [])
    assert (result.occurrences, result.rows_loaded) == (2, 0)
    assert any("multimedia.txt is empty" in n for n in result.notes)


@pytest.mark.parametrize(("attribute", "value"), [("index", "one"), ("ignoreHeaderLines", "1.5")])
def test_meta_numbers_that_are_not_numbers(tmp_path: Path, attribute: str, value: str) -> None:
    meta = _meta().replace('<field index="2"', f'<field index="{value}"', 1) if attribute == "index" else (
        _meta(attrs=f'fieldsTerminatedBy="\\t" ignoreHeaderLines="{value}"'))  # fmt: skip
    path = _zip(tmp_path / "a.zip", {"meta.xml": meta, "occurrence.txt": _table(CORE), "multimedia.txt": _table(MEDIA)})
    with pytest.raises(ArchiveError, match=f"{attribute}='{value}'.*not a whole number"):
        load_archive(path, duckdb.connect(), [])


def test_path_with_an_apostrophe_and_a_lower_memory_budget(tmp_path: Path) -> None:
    """A home such as /data/o'brien/ works (paths are SQL literals), and a connection's smaller
    memory budget (GBIF_ASSETS_DUCKDB_MEMORY) is kept, not raised to the ingest's 1 GB."""
    folder = tmp_path / "o'brien"
    folder.mkdir()
    path = _zip(
        folder / "a.zip", {"meta.xml": _meta(), "occurrence.txt": _table(CORE), "multimedia.txt": _table(MEDIA)}
    )
    con = duckdb.connect()
    con.execute("SET memory_limit = '300MB'")
    load_archive(path, con, [])
    assert con.execute("SELECT count(*) FROM occurrences").fetchone() == (2,)
    assert con.execute("SELECT current_setting('memory_limit')").fetchone() == ("286.1 MiB",)


def test_raw_tab_in_fields_terminated_by(tmp_path: Path) -> None:
    """A literal tab character in the attribute reaches us as a space (XML normalises attribute
    whitespace); the header shows the file is tab-separated, and it is read as such."""
    meta = _meta(attrs='fieldsTerminatedBy="\t" fieldsEnclosedBy="" ignoreHeaderLines="1"')
    path = _zip(tmp_path / "a.zip", {"meta.xml": meta, "occurrence.txt": _table(CORE), "multimedia.txt": _table(MEDIA)})
    assert _loaded(path) == EXPECTED
