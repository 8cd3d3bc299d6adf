"""Exports real clients load: the ImageFolder tree (already the layout), Hugging Face
`imagefolder` metadata, and a Croissant (MLCommons) JSON-LD description with licences and citation.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gbif_assets.manifest.licenses import license_url
from gbif_assets.reports.licenses import write_csv
from gbif_assets.reports.metadata import rows_of

SPLITS = ("train", "val", "test")
HF_COLUMNS = ["file_name", "label", "gbif_id", "license", "creator", "source_url"]
HF_METADATA = "metadata.jsonl"  # JSON Lines keep types: a CSV's labels 3189866 would load as int64


@dataclass
class ExportResult:
    """Where the exports are."""

    rows: int
    hf_metadata: Path
    hf_metadata_files: list[Path]
    table_csv: Path
    croissant: Path


def hf_metadata(home: Path) -> tuple[list[Path], Path, int]:
    """images/<split>/metadata.jsonl for Hugging Face `imagefolder`; reports/images.csv (all rows).

    `imagefolder` reads one metadata file per split folder, with `file_name` relative to that
    folder (a single images/metadata.jsonl is ignored when split folders exist); `val` maps to the
    `validation` split by the library's split-name keywords. With a metadata file the library
    takes no class from the folder names, so `label` is there as text (speciesKey 3189866 as
    "3189866", not an int64); README casts it to one ClassLabel for every split.
    """
    rows = rows_of(
        home,
        """SELECT substr(path, length('images/') + 1) AS file_name, label, split,
                  "gbifID" AS gbif_id, license, coalesce(creator, "rightsHolder") AS creator,
                  coalesce("references", url) AS source_url, path
           FROM images ORDER BY path""",
    )
    unknown = sorted({r["split"] for r in rows} - set(SPLITS))
    if unknown:
        raise ValueError(f"images.parquet has split {unknown[0]!r}; exports know only {', '.join(SPLITS)}")
    written = []
    for split in SPLITS:
        (home / "images" / split / "metadata.csv").unlink(missing_ok=True)  # an earlier version's: two would clash
        part = [dict(r, file_name=r["file_name"].split("/", 1)[1]) for r in rows if r["split"] == split]
        if part:
            written.append(_write_jsonl(home / "images" / split / HF_METADATA, part, HF_COLUMNS))
            continue
        (home / "images" / split / HF_METADATA).unlink(missing_ok=True)  # emptied by a refresh: no stale listing
        with contextlib.suppress(OSError):  # gone already, or still holding something
            (home / "images" / split).rmdir()
    table = write_csv(home / "reports" / "images.csv", rows, ["file_name", "split", *HF_COLUMNS[1:], "path"])
    return written, table, len(rows)


def _write_jsonl(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> Path:
    """One JSON object per row, through a temporary file; identifiers and labels as text."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            record = {c: row.get(c) for c in columns}
            for column in ("label", "gbif_id"):
                record[column] = None if record[column] is None else str(record[column])
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def croissant(
    home: Path,
    name: str,
    description: str,
    citation: str,
    licenses: list[str],
    formats: list[tuple[str, str]],
) -> Path:
    """<home>/croissant.json: a Croissant 1.0 description of the image set and its metadata table
    (at the dataset root, so its relative contentUrl values resolve against the dataset folder)."""
    urls = [license_url(lic) or lic for lic in licenses]
    today = dt.date.today()
    doc: dict[str, Any] = {
        "@context": {
            "@language": "en",
            "@vocab": "https://schema.org/",
            "citeAs": "cr:citeAs",
            "column": "cr:column",
            "conformsTo": "dct:conformsTo",
            "cr": "http://mlcommons.org/croissant/",
            "rai": "http://mlcommons.org/croissant/RAI/",
            "data": {"@id": "cr:data", "@type": "@json"},
            "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
            "dct": "http://purl.org/dc/terms/",
            "equivalentProperty": "cr:equivalentProperty",
            "examples": {"@id": "cr:examples", "@type": "@json"},
            "extract": "cr:extract",
            "field": "cr:field",
            "fileProperty": "cr:fileProperty",
            "fileObject": "cr:fileObject",
            "fileSet": "cr:fileSet",
            "format": "cr:format",
            "includes": "cr:includes",
            "isLiveDataset": "cr:isLiveDataset",
            "jsonPath": "cr:jsonPath",
            "key": "cr:key",
            "md5": "cr:md5",
            "parentField": "cr:parentField",
            "path": "cr:path",
            "recordSet": "cr:recordSet",
            "references": "cr:references",
            "regex": "cr:regex",
            "repeated": "cr:repeated",
            "replace": "cr:replace",
            "samplingRate": "cr:samplingRate",
            "sc": "https://schema.org/",
            "separator": "cr:separator",
            "source": "cr:source",
            "subField": "cr:subField",
            "transform": "cr:transform",
        },
        "@type": "sc:Dataset",
        "conformsTo": "http://mlcommons.org/croissant/1.0",
        "name": name,
        "description": description,
        "url": "https://www.gbif.org/",
        "license": urls,
        "citeAs": citation,
        "datePublished": today.isoformat(),
        # A refresh is a new version: the date of the build.
        "version": f"{today.year}.{today.month}.{today.day}",
        "distribution": [
            {
                "@type": "cr:FileObject",
                "@id": "images.csv",
                "name": "images.csv",
                "description": "per image: file under images/, label, split, licence, credit",
                "contentUrl": "reports/images.csv",
                "encodingFormat": "text/csv",
                "sha256": _sha256(home / "reports" / "images.csv"),
            },
            *[
                {
                    "@type": "cr:FileSet",
                    "@id": f"{ext}-files",
                    "name": f"{ext}-files",
                    "description": f"{mime} images, ImageFolder layout images/<split>/<label>/",
                    "encodingFormat": mime,
                    "includes": f"images/*/*/*.{ext}",
                }
                for ext, mime in formats
            ],
        ],
        "recordSet": [
            {
                "@type": "cr:RecordSet",
                "@id": "images",
                "name": "images",
                "field": [
                    _field("file_name", "sc:Text", "file_name", "path relative to images/"),
                    _field("label", "sc:Text", "label", "class label (GBIF key)"),
                    _field("path", "sc:Text", "path", "path relative to the dataset folder"),
                    _field("split", "sc:Text", "split", "train, val or test"),
                    _field("gbif_id", "sc:Text", "gbif_id", "GBIF occurrence id"),
                    _field("license", "sc:Text", "license", "normalized licence id of the image"),
                    _field("creator", "sc:Text", "creator", "creator or rights holder to credit"),
                    _field("source_url", "sc:URL", "source_url", "where the image was published"),
                ],
            }
        ],
    }
    path = home / "croissant.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _field(name: str, data_type: str, column: str, description: str) -> dict[str, Any]:
    return {
        "@type": "cr:Field",
        "@id": f"images/{name}",
        "name": name,
        "description": description,
        "dataType": data_type,
        "source": {"fileObject": {"@id": "images.csv"}, "extract": {"column": column}},
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_all(home: Path, name: str, description: str, citation: str) -> ExportResult:
    """Both exports; the Croissant file lists the licences and image formats actually present."""
    files, table, rows = hf_metadata(home)
    licenses = [
        r["license"] for r in rows_of(home, "SELECT DISTINCT license FROM images WHERE license IS NOT NULL ORDER BY 1")
    ]
    mimes = {
        "jpg": "image/jpeg",
        "jpeg": "image/jpeg",
        "png": "image/png",
        "gif": "image/gif",
        "webp": "image/webp",
        "tif": "image/tiff",
        "tiff": "image/tiff",
    }
    exts = sorted(
        {
            r["ext"]
            for r in rows_of(
                home,
                "SELECT DISTINCT lower(regexp_extract(path, '\\.([^.]+)$', 1)) AS ext FROM images",
            )
        }
    )
    formats = [(ext, mimes.get(ext, f"image/{ext}")) for ext in exts]
    path = croissant(home, name, description, citation, licenses, formats)
    return ExportResult(
        rows=rows,
        hf_metadata=home / "images",
        hf_metadata_files=files,
        table_csv=table,
        croissant=path,
    )
