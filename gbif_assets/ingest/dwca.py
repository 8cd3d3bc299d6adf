"""GBIF downloads (DWCA, SIMPLE_CSV, SIMPLE_PARQUET) into DuckDB, streaming and exact.

The DwC-A reader is driven by meta.xml: column positions come from the field indexes, never from
an assumed order (multimedia.txt changed its order between 2014 and today). Members are streamed
out of the zip to a scratch folder and read by DuckDB's CSV reader with GBIF's dialect (tab,
no quoting, no escaping, one header line), projecting only the needed columns. Malformed rows
are skipped and counted by reason; the table swap is one transaction.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from gbif_assets.ingest.result import ArchiveError, IngestResult
from gbif_assets.ingest.schema import DOUBLE_FIELDS, MEDIA_COLUMNS, OCCURRENCE_FIELDS, quote
from gbif_assets.ingest.tables import replace_table

MULTIMEDIA_ROW_TYPE = "http://rs.gbif.org/terms/1.0/Multimedia"
OCCURRENCE_ROW_TYPE = "http://rs.tdwg.org/dwc/terms/Occurrence"
NS = "{http://rs.tdwg.org/dwc/text/}"


@dataclass
class FileSpec:
    """One data file described by meta.xml."""

    location: str
    row_type: str
    delimiter: str = "\t"
    quote: str = ""
    header_lines: int = 1
    encoding: str = "UTF-8"
    id_index: int = 0
    columns: dict[int, str] = field(default_factory=dict)  # index -> term local name

    def index_of(self, name: str) -> int | None:
        for index, term in self.columns.items():
            if term == name:
                return index
        return None


def _unescape(value: str | None, default: str) -> str:
    if value is None:
        return default
    return value.replace("\\t", "\t").replace("\\n", "\n").replace("\\r", "\r")


def _local(term: str) -> str:
    return term.rstrip("/").rsplit("/", 1)[-1].rsplit("#", 1)[-1]


def parse_meta(xml: bytes, origin: str) -> tuple[FileSpec, list[FileSpec]]:
    """Core and extension file specs from meta.xml."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ArchiveError(f"{origin}: meta.xml is not valid XML ({exc})") from None

    def spec(element: ET.Element, id_tag: str) -> FileSpec:
        location = element.findtext(f"{NS}files/{NS}location") or element.findtext("files/location")
        if not location:
            raise ArchiveError(f"{origin}: meta.xml names no file for {element.get('rowType')}")
        id_el = element.find(f"{NS}{id_tag}") or element.find(id_tag)
        columns: dict[int, str] = {}
        for field_el in [*element.findall(f"{NS}field"), *element.findall("field")]:
            if field_el.get("index") is None:
                continue  # a constant default value, not a column
            columns.setdefault(int(field_el.get("index")), _local(field_el.get("term", "")))
        enclosed = element.get("fieldsEnclosedBy", "")
        return FileSpec(
            location=location.strip(),
            row_type=element.get("rowType", ""),
            delimiter=_unescape(element.get("fieldsTerminatedBy"), ","),
            quote=enclosed.replace("&quot;", '"'),
            header_lines=int(element.get("ignoreHeaderLines", "0")),
            encoding=element.get("encoding", "UTF-8"),
            id_index=int(id_el.get("index", "0")) if id_el is not None else 0,
            columns=columns,
        )

    core_el = root.find(f"{NS}core") or root.find("core")
    if core_el is None:
        raise ArchiveError(f"{origin}: meta.xml has no <core> element")
    core = spec(core_el, "id")
    extensions = [spec(e, "coreid") for e in [*root.findall(f"{NS}extension"), *root.findall("extension")]]
    return core, extensions


def _extract(archive: zipfile.ZipFile, member: str, scratch: Path, origin: str) -> Path:
    """Stream one member to disk; a truncated or corrupt member is an ArchiveError."""
    try:
        info = archive.getinfo(member)
    except KeyError:
        raise ArchiveError(f"{origin}: meta.xml names {member}, but the archive has no such file") from None
    target = scratch / Path(member).name
    try:
        with archive.open(info) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ArchiveError(f"{origin}: {member} is corrupt or truncated ({exc})") from None
    return target


def _check_header(path: Path, spec: FileSpec, origin: str) -> None:
    with path.open("rb") as handle:
        first = handle.readline()
    if not first.strip():
        raise ArchiveError(f"{origin}: {spec.location} is empty")
    if spec.header_lines:
        try:
            header = first.decode("utf-8").rstrip("\r\n").split(spec.delimiter)
        except UnicodeDecodeError:
            raise ArchiveError(f"{origin}: the header of {spec.location} is not UTF-8") from None
        if spec.columns and len(header) <= max(spec.columns):
            raise ArchiveError(
                f"{origin}: {spec.location} has {len(header)} columns but meta.xml describes {max(spec.columns) + 1}"
            )


def _csv(path: Path, spec: FileSpec, width: int) -> str:
    """A read_csv() call with GBIF's dialect and every column as VARCHAR."""
    names = {i: f"c{i}" for i in range(width)}
    columns = "{" + ", ".join(f"'{names[i]}': 'VARCHAR'" for i in range(width)) + "}"
    delim = spec.delimiter.replace("'", "''")
    quote_char = spec.quote.replace("'", "''")
    return (
        f"read_csv('{path.as_posix()}', delim='{delim}', quote='{quote_char}', escape='{quote_char}', "
        f"header={'true' if spec.header_lines else 'false'}, columns={columns}, auto_detect=false, "
        "ignore_errors=true, store_rejects=true, parallel=true, strict_mode=true, null_padding=false)"
    )


def _header_width(path: Path, spec: FileSpec) -> int:
    with path.open("rb") as handle:
        first = handle.readline().decode("utf-8", "replace").rstrip("\r\n")
    return max(len(first.split(spec.delimiter)), max(spec.columns, default=0) + 1)


def _rejects(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    try:
        rows = con.execute(
            "SELECT error_type, count(DISTINCT (file_id, line)) FROM reject_errors GROUP BY ALL"
        ).fetchall()
    except duckdb.Error:
        return {}
    names = {
        "TOO MANY COLUMNS": "too_many_fields",
        "MISSING COLUMNS": "too_few_fields",
        "INVALID UNICODE": "not_utf8",
        "INVALID ENCODING": "not_utf8",
    }
    return {names.get(str(kind), str(kind).lower().replace(" ", "_")): int(n) for kind, n in rows}


def _setup(con: duckdb.DuckDBPyConnection, scratch: Path) -> None:
    con.execute("SET threads = 2")
    con.execute("SET preserve_insertion_order = false")
    con.execute(f"SET temp_directory = '{(scratch / 'duckdb_tmp').as_posix()}'")
    con.execute("SET memory_limit = '1GB'")


def load_archive(
    zip_path: Path, con: duckdb.DuckDBPyConnection, fields: list[str], table: str = "occurrences"
) -> IngestResult:
    """Load a GBIF download zip into `table` (one row per media item); previous table kept on error."""
    started = time.monotonic()
    origin = str(zip_path)
    try:
        archive = zipfile.ZipFile(zip_path)
    except FileNotFoundError:
        raise ArchiveError(f"{origin}: archive not found") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{origin}: not a readable zip, probably truncated ({exc})") from None
    with archive, tempfile.TemporaryDirectory(prefix="ingest-", dir=zip_path.parent) as tmp:
        scratch = Path(tmp)
        names = archive.namelist()
        if not names:
            raise ArchiveError(f"{origin}: the archive is empty")
        _setup(con, scratch)
        if "meta.xml" in names:
            result = _load_dwca(archive, con, fields, table, scratch, origin)
        elif any(n.endswith(".parquet") for n in names):
            result = _load_simple(archive, con, fields, table, scratch, origin, "SIMPLE_PARQUET")
        elif any(n.endswith(".csv") for n in names):
            result = _load_simple(archive, con, fields, table, scratch, origin, "SIMPLE_CSV")
        else:
            raise ArchiveError(f"{origin}: no meta.xml (not a Darwin Core Archive) and no .csv or .parquet data")
    result.seconds = time.monotonic() - started
    return result


def _wanted(fields: list[str]) -> list[tuple[str, str]]:
    """(output column, archive term) of every occurrence column the table needs."""
    return [("occurrence_license", "license"), *[(f, f) for f in OCCURRENCE_FIELDS], *[(f, f) for f in fields]]


def _wanted_terms(fields: list[str]) -> list[str]:
    return [term for _, term in _wanted(fields)]


def _occurrence_select(core: FileSpec, fields: list[str]) -> tuple[list[str], list[str]]:
    """SELECT expressions for the occurrence columns, and the ones the archive lacks."""
    exprs, missing = [], []
    for out_name, term in _wanted(fields):
        index = core.index_of(term)
        if index is None:
            missing.append(term)
            value = "NULL"
        else:
            value = f"NULLIF(o.c{index}, '')"
        if out_name in DOUBLE_FIELDS:
            value = f"TRY_CAST({value} AS DOUBLE)"
        exprs.append(f"{value} AS {quote(out_name)}")
    return exprs, missing


def _load_dwca(
    archive: zipfile.ZipFile,
    con: duckdb.DuckDBPyConnection,
    fields: list[str],
    table: str,
    scratch: Path,
    origin: str,
) -> IngestResult:
    core, extensions = parse_meta(archive.read("meta.xml"), origin)
    if core.row_type and core.row_type != OCCURRENCE_ROW_TYPE:
        raise ArchiveError(f"{origin}: the core is {core.row_type}, not occurrences")
    for spec in (core, *extensions):
        if spec.encoding.upper().replace("-", "") not in ("UTF8", ""):
            raise ArchiveError(f"{origin}: {spec.location} is {spec.encoding}; GBIF archives are UTF-8")
    media_spec = next((e for e in extensions if e.row_type == MULTIMEDIA_ROW_TYPE), None)
    core_path = _extract(archive, core.location, scratch, origin)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="inflate") as pool:
        # inflate multimedia.txt while DuckDB parses the core: zlib and DuckDB both release the GIL
        media_path = pool.submit(_extract, archive, media_spec.location, scratch, origin) if media_spec else None
        return _stage_and_join(con, core, core_path, media_spec, media_path, fields, table, origin)


def _stage_and_join(
    con: duckdb.DuckDBPyConnection,
    core: FileSpec,
    core_path: Path,
    media_spec: FileSpec | None,
    media_path: Future[Path] | None,
    fields: list[str],
    table: str,
    origin: str,
) -> IngestResult:
    """Stage the used columns of both files, then one join writes the table (one media row each)."""
    _check_header(core_path, core, origin)
    occ_source = _csv(core_path, core, _header_width(core_path, core))
    notes: list[str] = []
    occ_exprs, missing = _occurrence_select(core, fields)
    # stage only the columns we use: a GBIF occurrence.txt has ~250, we need ~25
    used = (
        ", ".join(f"c{i}" for i in sorted({core.index_of(t) for t in _wanted_terms(fields)} - {None}))
        or "NULL AS c_none"
    )
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE occ_stage AS "
        f"SELECT NULLIF(c{core.id_index}, '') AS gbifID, {used} FROM {occ_source}"
    )
    skipped = {f"occurrence_{k}": v for k, v in _rejects(con).items()}
    occurrences = con.execute("SELECT count(*) FROM occ_stage").fetchone()[0]
    if media_spec is None or media_path is None:
        notes.append("the archive has no multimedia.txt: zero media items, nothing to download")
        media_select = "SELECT NULL::VARCHAR AS gbifID, NULL::INTEGER AS media_index WHERE false"
        media_exprs = [f"NULL::VARCHAR AS {quote(c)}" for c in MEDIA_COLUMNS]
    else:
        path = media_path.result()
        _check_header(path, media_spec, origin)
        width = _header_width(path, media_spec)
        media_used = ", ".join(f"c{i}" for i in sorted({media_spec.index_of(c) for c in MEDIA_COLUMNS} - {None}))
        ident = media_spec.index_of("identifier")
        # media_index: the item's place among its occurrence's media, by URL (stable across exports);
        # numbered here on the staged rows, a third as wide as the joined ones
        order = f"c{ident}" if ident is not None else f"c{media_spec.id_index}"
        media_select = (
            f"SELECT NULLIF(c{media_spec.id_index}, '') AS gbifID, {media_used or 'NULL AS c_none'}, "
            f"CAST(row_number() OVER (PARTITION BY NULLIF(c{media_spec.id_index}, '') ORDER BY {order}) - 1 AS INTEGER)"
            f" AS media_index FROM {_csv(path, media_spec, width)}"
        )
        media_exprs = []
        for name in MEDIA_COLUMNS:
            index = media_spec.index_of(name)
            media_exprs.append(
                f"NULLIF(m.c{index}, '') AS {quote(name)}" if index is not None else f"NULL::VARCHAR AS {quote(name)}"
            )
    con.execute(f"CREATE OR REPLACE TEMP TABLE media_stage AS {media_select}")
    skipped.update({f"media_{k}": v for k, v in _rejects(con).items()})
    media_rows = con.execute("SELECT count(*) FROM media_stage").fetchone()[0]
    orphans = con.execute("SELECT count(*) FROM media_stage m ANTI JOIN occ_stage o ON m.gbifID = o.gbifID").fetchone()[
        0
    ]
    if orphans:
        skipped["media_without_occurrence"] = int(orphans)
    select = (
        f"SELECT m.gbifID, m.media_index, {', '.join(media_exprs)}, {', '.join(occ_exprs)} "
        "FROM media_stage m JOIN occ_stage o ON m.gbifID = o.gbifID"
    )
    rows = replace_table(con, table, select)
    con.execute("DROP TABLE IF EXISTS occ_stage")
    con.execute("DROP TABLE IF EXISTS media_stage")
    if skipped:
        notes.append("skipped rows: " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    if missing:
        notes.append(f"columns absent from the archive (left empty): {', '.join(missing)}")
    return IngestResult(
        format="DWCA",
        occurrences=int(occurrences),
        media_rows=int(media_rows),
        rows_loaded=rows,
        skipped=skipped,
        missing_columns=missing,
        notes=notes,
    )


def _load_simple(
    archive: zipfile.ZipFile,
    con: duckdb.DuckDBPyConnection,
    fields: list[str],
    table: str,
    scratch: Path,
    origin: str,
    fmt: str,
) -> IngestResult:
    """SIMPLE_CSV / SIMPLE_PARQUET carry no media links: count occurrences, load zero media rows."""
    if fmt == "SIMPLE_CSV":
        member = next(n for n in archive.namelist() if n.endswith(".csv"))
        path = _extract(archive, member, scratch, origin)
        spec = FileSpec(location=member, row_type=OCCURRENCE_ROW_TYPE, delimiter="\t")
        with path.open("rb") as handle:
            header = handle.readline().decode("utf-8", "replace").rstrip("\r\n").split("\t")
        spec.columns = dict(enumerate(header))
        source = _csv(path, spec, len(header))
    else:
        for member in archive.namelist():
            if member.endswith(".parquet"):
                _extract(archive, member, scratch, origin)
        source = f"read_parquet('{(scratch / '*.parquet').as_posix()}')"
    try:
        occurrences = con.execute(f"SELECT count(*) FROM {source}").fetchone()[0]
    except duckdb.Error as exc:
        raise ArchiveError(f"{origin}: cannot read the {fmt} data ({exc})") from None
    columns = [f"NULL::VARCHAR AS {quote(c)}" for c in ("gbifID",)]
    columns.append("NULL::INTEGER AS media_index")
    columns += [f"NULL::VARCHAR AS {quote(c)}" for c in MEDIA_COLUMNS]
    columns.append(f"NULL::VARCHAR AS {quote('occurrence_license')}")
    columns += [
        f"NULL::{'DOUBLE' if c in DOUBLE_FIELDS else 'VARCHAR'} AS {quote(c)}" for c in [*OCCURRENCE_FIELDS, *fields]
    ]
    rows = replace_table(con, table, f"SELECT {', '.join(columns)} WHERE false")
    return IngestResult(
        format=fmt,
        occurrences=int(occurrences),
        media_rows=0,
        rows_loaded=rows,
        notes=[
            f"{fmt} downloads carry no media links ({occurrences:,} occurrences, 0 images): "
            "request format DWCA (download mode does this) to get multimedia.txt"
        ],
    )
