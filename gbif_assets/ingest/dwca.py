"""GBIF downloads (DWCA, SIMPLE_CSV, SIMPLE_PARQUET) into DuckDB, streaming and exact.

The DwC-A reader is driven by meta.xml: column positions come from the field indexes, never from
an assumed order (multimedia.txt changed its order between 2014 and today). Members are streamed
out of the zip to a scratch folder and read by DuckDB's CSV reader with GBIF's dialect (tab,
no quoting, no escaping, one header line), projecting only the needed columns. Malformed rows
are skipped and counted by reason; the table swap is one transaction.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import duckdb

from gbif_assets.ingest.result import ArchiveError, IngestResult
from gbif_assets.ingest.schema import DOUBLE_FIELDS, MEDIA_COLUMNS, OCCURRENCE_FIELDS, literal, quote
from gbif_assets.ingest.tables import replace_table

MULTIMEDIA_ROW_TYPE = "http://rs.gbif.org/terms/1.0/Multimedia"
AUDUBON_ROW_TYPE = "http://rs.tdwg.org/ac/terms/Multimedia"
# Audubon Core terms that stand for a media column (local names, first found wins); the shared
# Dublin Core ones (type, format, title, creator, publisher...) already carry the column's name.
AUDUBON_TERMS = {
    "identifier": ["accessURI"],
    "references": ["furtherInformationURL", "attributionLinkURL"],
    "license": ["WebStatement", "UsageTerms", "rights"],
    "rightsHolder": ["Owner", "owner"],
    "description": ["caption"],
    "created": ["CreateDate"],
    "source": ["providerLiteral"],
}
OCCURRENCE_ROW_TYPE = "http://rs.tdwg.org/dwc/terms/Occurrence"
NS = "{http://rs.tdwg.org/dwc/text/}"
INGEST_MEMORY = 10**9  # the most DuckDB may hold while loading, 1 GB: past it, it spills (large archives in 1.5 GB)
UNITS = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


@dataclass
class FileSpec:
    """One data file described by meta.xml."""

    location: str  # the first file, for messages
    row_type: str
    delimiter: str = "\t"
    quote: str = ""
    header_lines: int = 1
    encoding: str = "UTF-8"
    id_index: int = 0
    columns: dict[int, str] = field(default_factory=dict)  # index -> term local name
    defaults: dict[str, str] = field(default_factory=dict)  # term local name -> meta.xml default value
    locations: list[str] = field(default_factory=list)  # every file (the text guide allows several)

    def renamed(self, aliases: dict[str, list[str]]) -> FileSpec:
        """This spec with each column in `aliases` taken from the first alias it has, when it has
        no column of that name itself (Audubon Core's accessURI is the media's identifier)."""
        columns, defaults = dict(self.columns), dict(self.defaults)
        for name, candidates in aliases.items():
            if self.index_of(name) is not None or name in defaults:
                continue
            for alias in candidates:
                if (index := self.index_of(alias)) is not None or alias in defaults:
                    if index is not None:
                        columns[index] = name
                    if alias in defaults:
                        defaults[name] = defaults[alias]
                    break
        return dataclasses.replace(self, columns=columns, defaults=defaults)

    def index_of(self, name: str) -> int | None:
        for index, term in self.columns.items():
            if term == name:
                return index
        return None

    def expr(self, name: str, alias: str) -> str | None:
        """SQL for term `name` of a row (`alias` is the table alias): its column, with the meta.xml
        default where the cell is empty, or the default alone when no column holds it."""
        index = self.index_of(name)
        default = self.defaults.get(name)
        if index is None:
            return None if default is None else literal(default)
        column = f"NULLIF({alias}.c{index}, '')"
        return column if default is None else f"COALESCE({column}, {literal(default)})"


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

    def number(element: ET.Element, attribute: str, default: str) -> int:
        value = element.get(attribute, default)
        try:
            return int(value)
        except ValueError:
            raise ArchiveError(
                f"{origin}: meta.xml {attribute}={value!r} in <{element.tag.rsplit('}', 1)[-1]}> is not a whole number"
            ) from None

    def spec(element: ET.Element, id_tag: str) -> FileSpec:
        where = [*element.findall(f"{NS}files/{NS}location"), *element.findall("files/location")]
        locations = [e.text.strip() for e in where if e.text and e.text.strip()]
        if not locations:
            raise ArchiveError(f"{origin}: meta.xml names no file for {element.get('rowType')}")
        id_el = element.find(f"{NS}{id_tag}")  # an <id/> has no children, so it is falsy: no `or` here
        if id_el is None:
            id_el = element.find(id_tag)
        columns: dict[int, str] = {}
        defaults: dict[str, str] = {}
        for field_el in [*element.findall(f"{NS}field"), *element.findall("field")]:
            term = _local(field_el.get("term", ""))
            if field_el.get("default") is not None:  # fills the column's empty cells, or is the column
                defaults.setdefault(term, field_el.get("default", ""))
            if field_el.get("index") is not None:
                columns.setdefault(number(field_el, "index", "0"), term)
        # the text guide's defaults: comma-separated, enclosed by double quotes, no header line
        enclosed = element.get("fieldsEnclosedBy", '"')
        return FileSpec(
            location=locations[0],
            row_type=element.get("rowType", ""),
            delimiter=_unescape(element.get("fieldsTerminatedBy"), ","),
            quote=enclosed.replace("&quot;", '"'),
            header_lines=number(element, "ignoreHeaderLines", "0"),
            encoding=element.get("encoding", "UTF-8"),
            id_index=number(id_el, "index", "0") if id_el is not None else 0,
            columns=columns,
            defaults=defaults,
            locations=locations,
        )

    core_el = root.find(f"{NS}core")
    if core_el is None:
        core_el = root.find("core")
    if core_el is None:
        raise ArchiveError(f"{origin}: meta.xml has no <core> element")
    core = spec(core_el, "id")
    extensions = [spec(e, "coreid") for e in [*root.findall(f"{NS}extension"), *root.findall("extension")]]
    return core, extensions


@contextlib.contextmanager
def _member(archive: zipfile.ZipFile, member: str, origin: str) -> Iterator[IO[bytes]]:
    """One member, open for reading; a missing, truncated or corrupt one is an ArchiveError."""
    try:
        info = archive.getinfo(member)
    except KeyError:
        raise ArchiveError(f"{origin}: meta.xml names {member}, but the archive has no such file") from None
    try:
        with archive.open(info) as handle:
            yield handle
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:  # zlib: its deflate data is broken
        raise ArchiveError(
            f"{origin}: {member} is corrupt or truncated ({exc}); delete the archive and run again to fetch it again"
        ) from None


def _extract(archive: zipfile.ZipFile, member: str, scratch: Path, origin: str) -> Path:
    """Stream one member to disk; a truncated or corrupt member is an ArchiveError."""
    with _member(archive, member, origin) as src:
        # a name of its own: core and extension files may share a base name in different folders
        fd, name = tempfile.mkstemp(dir=scratch, suffix="-" + Path(member).name)
        with open(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return Path(name)


def _header_line(path: Path, spec: FileSpec) -> bytes:
    """The line that names the columns: the last of the `ignoreHeaderLines`, or the first row."""
    with path.open("rb") as handle:
        line = handle.readline()
        for _ in range(spec.header_lines - 1):
            line = handle.readline() or line
    return line


def _fields(line: bytes, spec: FileSpec, errors: str = "strict") -> list[str]:
    """One line split as DuckDB will split it (a quoted field may hold the delimiter)."""
    text = line.decode("utf-8-sig", errors).rstrip("\r\n")
    if spec.quote and len(spec.quote) == 1 and len(spec.delimiter) == 1:
        return next(csv.reader([text], delimiter=spec.delimiter, quotechar=spec.quote), [])
    return text.split(spec.delimiter)


def _check_header(path: Path, spec: FileSpec, origin: str) -> None:
    first = _header_line(path, spec)
    if not first.strip():
        raise ArchiveError(f"{origin}: {spec.location} is empty")
    try:
        header = _fields(first, spec)
    except UnicodeDecodeError:
        raise ArchiveError(f"{origin}: the header of {spec.location} is not UTF-8") from None
    if spec.delimiter == " " and b"\t" in first and spec.columns and len(header) <= max(spec.columns):
        # a raw tab in fieldsTerminatedBy reads as a space (XML normalises attribute whitespace)
        spec.delimiter = "\t"
        header = _fields(first, spec)
    if spec.header_lines and spec.columns and len(header) <= max(spec.columns):
        raise ArchiveError(
            f"{origin}: {spec.location} has {len(header)} columns (split on {spec.delimiter!r}) "
            f"but meta.xml describes {max(spec.columns) + 1}"
        )


def _csv(paths: list[Path], spec: FileSpec, width: int, rejects: str) -> str:
    """A read_csv() call with the file's dialect and every column as VARCHAR; malformed rows go
    to the `rejects` table."""
    columns = "{" + ", ".join(f"'c{i}': 'VARCHAR'" for i in range(width)) + "}"
    skip = f"skip={spec.header_lines - 1}, " if spec.header_lines > 1 else ""
    return (
        f"read_csv([{', '.join(literal(p) for p in paths)}], delim={literal(spec.delimiter)}, "
        f"quote={literal(spec.quote)}, escape={literal(spec.quote)}, {skip}"
        f"header={'true' if spec.header_lines else 'false'}, columns={columns}, auto_detect=false, "
        f"ignore_errors=true, store_rejects=true, rejects_table='{rejects}', rejects_scan='{rejects}_scan', "
        "parallel=true, strict_mode=true, null_padding=false)"
    )


def _header_width(path: Path, spec: FileSpec) -> int:
    return max(len(_fields(_header_line(path, spec), spec, "replace")), max(spec.columns, default=0) + 1)


def _rejects(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, int]:
    try:
        rows = con.execute(f"SELECT error_type, count(DISTINCT (file_id, line)) FROM {table} GROUP BY ALL").fetchall()
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
    """Spill to the scratch folder, within the connection's memory budget and at most 1 GB."""
    con.execute("SET threads = 2")
    con.execute("SET preserve_insertion_order = false")
    con.execute(f"SET temp_directory = {literal(scratch / 'duckdb_tmp')}")
    amount, _, unit = str(con.execute("SELECT current_setting('memory_limit')").fetchone()[0]).partition(" ")
    with contextlib.suppress(ValueError):
        if float(amount) * UNITS.get(unit, 1) <= INGEST_MEMORY:
            return  # the caller's budget (GBIF_ASSETS_DUCKDB_MEMORY) is already lower
    con.execute(f"SET memory_limit = '{INGEST_MEMORY // 10**6}MB'")


def _scratch_parent(zip_path: Path) -> Path | None:
    """Beside the archive (the dataset's disk, which has room for it unzipped), or the system's
    temporary folder when that one is read-only."""
    return zip_path.parent if os.access(zip_path.parent, os.W_OK | os.X_OK) else None


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
    with archive, tempfile.TemporaryDirectory(prefix="ingest-", dir=_scratch_parent(zip_path)) as tmp:
        scratch = Path(tmp)
        names = archive.namelist()
        if not names:
            raise ArchiveError(f"{origin}: the archive is empty")
        _setup(con, scratch)
        if "meta.xml" in names:
            result = _load_dwca(archive, con, fields, table, scratch, origin)
        elif any(_parquet_part(n) for n in names):
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
        value = core.expr(term, "o")
        if value is None:
            missing.append(term)
            value = "NULL"
        if out_name in DOUBLE_FIELDS:
            value = f"TRY_CAST({value} AS DOUBLE)"
        exprs.append(f"{value} AS {quote(out_name)}")
    return exprs, missing


def _media_expr(spec: FileSpec, name: str) -> str:
    """SQL for a media column; the link is trimmed (" http://..." is a link, the spaces are not)."""
    expr = spec.expr(name, "m") or "NULL::VARCHAR"
    return f"NULLIF(trim({expr}), '')" if name == "identifier" else expr


def _has_rows(archive: zipfile.ZipFile, spec: FileSpec, origin: str) -> bool:
    """Whether a data file holds a row past its header lines (read from the zip, not extracted)."""
    for location in spec.locations:
        with _member(archive, location, origin) as handle:
            lead = handle.read(1 << 16)
        if len(lead) == 1 << 16 or len([line for line in lead.splitlines() if line.strip()]) > spec.header_lines:
            return True
    return False


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
    notes: list[str] = []
    audubon = next((e for e in extensions if e.row_type == AUDUBON_ROW_TYPE), None)
    if audubon is not None and (media_spec is None or not _has_rows(archive, media_spec, origin)):
        # GBIF interprets Audubon Core into multimedia.txt; an archive without that still has the links
        notes.append(f"media read from the Audubon Core extension {audubon.location} (GBIF's multimedia.txt has none)")
        media_spec = audubon.renamed(AUDUBON_TERMS)
    core_paths = [_extract(archive, location, scratch, origin) for location in core.locations]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="inflate") as pool:
        # inflate multimedia.txt while DuckDB parses the core: zlib and DuckDB both release the GIL
        media_paths = (
            pool.submit(lambda: [_extract(archive, loc, scratch, origin) for loc in media_spec.locations])
            if media_spec
            else None
        )
        return _stage_and_join(con, core, core_paths, media_spec, media_paths, fields, table, origin, notes)


def _stage_and_join(
    con: duckdb.DuckDBPyConnection,
    core: FileSpec,
    core_paths: list[Path],
    media_spec: FileSpec | None,
    media_paths: Future[list[Path]] | None,
    fields: list[str],
    table: str,
    origin: str,
    notes: list[str],
) -> IngestResult:
    """Stage the used columns of both files, then one join writes the table (one media row each)."""
    for path in core_paths:
        _check_header(path, core, origin)
    occ_source = _csv(core_paths, core, _header_width(core_paths[0], core), "occ_rejects")
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
    skipped = {f"occurrence_{k}": v for k, v in _rejects(con, "occ_rejects").items()}
    occurrences = con.execute("SELECT count(*) FROM occ_stage").fetchone()[0]
    paths = media_paths.result() if media_paths is not None else []
    if media_spec is not None and not any(p.stat().st_size for p in paths):
        notes.append(f"{media_spec.location} is empty: zero media items, nothing to download")
        media_spec = None
    if media_spec is None:
        if not notes:
            notes.append(
                "the archive has no multimedia.txt (nor Audubon Core media): zero media items, nothing to download"
            )
        media_select = "SELECT NULL::VARCHAR AS gbifID, NULL::INTEGER AS media_index WHERE false"
        media_exprs = [f"NULL::VARCHAR AS {quote(c)}" for c in MEDIA_COLUMNS]
    else:
        paths = [p for p in paths if p.stat().st_size]
        for path in paths:
            _check_header(path, media_spec, origin)
        width = _header_width(paths[0], media_spec)
        media_used = ", ".join(f"c{i}" for i in sorted({media_spec.index_of(c) for c in MEDIA_COLUMNS} - {None}))
        ident = media_spec.index_of("identifier")
        # media_index: the item's place among its occurrence's media, by URL (stable across exports);
        # numbered here on the staged rows, a third as wide as the joined ones
        order = f"c{ident}" if ident is not None else f"c{media_spec.id_index}"
        media_select = (
            f"SELECT NULLIF(c{media_spec.id_index}, '') AS gbifID, {media_used or 'NULL AS c_none'}, "
            f"CAST(row_number() OVER (PARTITION BY NULLIF(c{media_spec.id_index}, '') ORDER BY {order}) - 1 AS INTEGER)"
            f" AS media_index FROM {_csv(paths, media_spec, width, 'media_rejects')}"
        )
        media_exprs = [f"{_media_expr(media_spec, name)} AS {quote(name)}" for name in MEDIA_COLUMNS]
    con.execute(f"CREATE OR REPLACE TEMP TABLE media_stage AS {media_select}")
    skipped.update({f"media_{k}": v for k, v in _rejects(con, "media_rejects").items()})
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


def _parquet_part(member: str) -> bool:
    """A file of a SIMPLE_PARQUET download: GBIF writes them as `occurrence.parquet/000000`,
    `000001`... (a folder of parts without extensions); a plain `x.parquet` counts too."""
    return not member.endswith("/") and (member.endswith(".parquet") or ".parquet/" in member)


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
    skipped: dict[str, int] = {}
    if fmt == "SIMPLE_CSV":  # one tab-separated file; anything else beside it (a README) is not the data
        member = max((i for i in archive.infolist() if i.filename.endswith(".csv")), key=lambda i: i.file_size).filename
        path = _extract(archive, member, scratch, origin)
        spec = FileSpec(location=member, row_type=OCCURRENCE_ROW_TYPE, delimiter="\t", quote="")
        header = _header_line(path, spec).decode("utf-8", "replace").rstrip("\r\n").split("\t")
        spec.columns = dict(enumerate(header))
        source = _csv([path], spec, len(header), "simple_rejects")
    else:
        parts = [_extract(archive, m, scratch, origin) for m in archive.namelist() if _parquet_part(m)]
        source = f"read_parquet([{', '.join(literal(part) for part in parts)}])"
    try:
        occurrences = con.execute(f"SELECT count(*) FROM {source}").fetchone()[0]
    except duckdb.Error as exc:
        raise ArchiveError(f"{origin}: cannot read the {fmt} data ({exc})") from None
    if fmt == "SIMPLE_CSV":
        skipped = {f"occurrence_{k}": v for k, v in _rejects(con, "simple_rejects").items()}
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
        skipped=skipped,
        notes=[
            f"{fmt} downloads carry no media links ({occurrences:,} occurrences, 0 images): "
            "request format DWCA (download mode does this) to get multimedia.txt"
        ],
    )
