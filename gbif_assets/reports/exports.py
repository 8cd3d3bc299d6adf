"""Exports real clients load: the ImageFolder tree (already the layout), Hugging Face
`imagefolder` metadata, and a Croissant (MLCommons) JSON-LD description with licences and citation.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gbif_assets.manifest.licenses import license_url
from gbif_assets.reports.licenses import write_csv
from gbif_assets.reports.metadata import rows_of


@dataclass
class ExportResult:
    """Where the exports are."""

    rows: int
    hf_metadata: Path
    croissant: Path


def hf_metadata(home: Path) -> tuple[Path, int]:
    """images/metadata.csv: `file_name` relative to images/, plus label and licence columns."""
    rows = rows_of(
        home,
        """SELECT substr(path, length('images/') + 1) AS file_name, label, split, "gbifID" AS gbif_id,
                  license, coalesce(creator, "rightsHolder") AS creator, coalesce("references", url) AS source_url
           FROM images ORDER BY path""",
    )
    path = write_csv(home / "images" / "metadata.csv", rows, ["file_name", "label", "split", "gbif_id", "license", "creator", "source_url"])
    return path, len(rows)


def croissant(home: Path, name: str, description: str, citation: str, licenses: list[str]) -> Path:
    """A Croissant 1.0 description of the image set and its metadata table."""
    urls = [license_url(lic) or lic for lic in licenses]
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
        "datePublished": dt.date.today().isoformat(),
        "distribution": [
            {
                "@type": "cr:FileObject",
                "@id": "metadata.csv",
                "name": "metadata.csv",
                "contentUrl": "images/metadata.csv",
                "encodingFormat": "text/csv",
                "sha256": _sha256(home / "images" / "metadata.csv"),
            },
            {
                "@type": "cr:FileSet",
                "@id": "image-files",
                "name": "image-files",
                "encodingFormat": "image/jpeg",
                "includes": "images/*/*/*.jpg",
            },
        ],
        "recordSet": [
            {
                "@type": "cr:RecordSet",
                "@id": "images",
                "name": "images",
                "field": [
                    _field("file_name", "sc:Text", "file_name", "path relative to images/"),
                    _field("label", "sc:Text", "label", "class label (GBIF key)"),
                    _field("split", "sc:Text", "split", "train, val or test"),
                    _field("gbif_id", "sc:Text", "gbif_id", "GBIF occurrence id"),
                    _field("license", "sc:Text", "license", "normalized licence id of the image"),
                    _field("creator", "sc:Text", "creator", "creator or rights holder to credit"),
                    _field("source_url", "sc:URL", "source_url", "where the image was published"),
                ],
            }
        ],
    }
    path = home / "reports" / "croissant.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return path


def _field(name: str, data_type: str, column: str, description: str) -> dict[str, Any]:
    return {
        "@type": "cr:Field",
        "@id": f"images/{name}",
        "name": name,
        "description": description,
        "dataType": data_type,
        "source": {"fileObject": {"@id": "metadata.csv"}, "extract": {"column": column}},
    }


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_all(home: Path, name: str, description: str, citation: str) -> ExportResult:
    """Both exports; the Croissant file lists the licences actually present."""
    hf, rows = hf_metadata(home)
    licenses = [r["license"] for r in rows_of(home, "SELECT DISTINCT license FROM images ORDER BY 1")]
    return ExportResult(rows=rows, hf_metadata=hf, croissant=croissant(home, name, description, citation, licenses))
