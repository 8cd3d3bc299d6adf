"""Licence report and attribution: what the user may do with the set, and whom to credit."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gbif_assets.manifest.licenses import license_url
from gbif_assets.reports.metadata import rows_of

RESTRICTED = ("NC", "ND")
ATTRIBUTION_COLUMNS = [
    "path", "title", "creator", "rights_holder", "source_url", "media_url", "occurrence_url",
    "license", "license_url", "license_raw",
]  # fmt: skip


@dataclass
class LicenseReport:
    """Counts per licence, rights holder and publisher, with warnings for restrictive licences."""

    rows: int
    per_license: list[dict[str, Any]]
    per_rights_holder: list[dict[str, Any]]
    per_publisher: list[dict[str, Any]]
    report_md: str
    files: list[str]
    warnings: list[str] = field(default_factory=list)


@dataclass
class AttributionResult:
    """The attribution file (one line per image)."""

    rows: int
    path: Path
    missing_creator: int
    warnings: list[str] = field(default_factory=list)


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Path:
    """CSV through a temporary file, so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = columns or (list(rows[0]) if rows else [])
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def md_table(rows: list[dict[str, Any]], limit: int = 50) -> str:
    """A Markdown table of the first rows."""
    if not rows:
        return "_none_\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows[:limit]:
        lines.append("| " + " | ".join(str(row[c]).replace("|", "\\|") for c in columns) + " |")
    if len(rows) > limit:
        lines.append(f"\n_{len(rows) - limit} more rows in the CSV_")
    return "\n".join(lines) + "\n"


def license_report(home: Path) -> LicenseReport:
    """reports/licenses.csv, rights_holders.csv, publishers.csv and licenses.md."""
    per_license = rows_of(
        home,
        "SELECT coalesce(license, 'unknown') AS license, count(*) AS images FROM images GROUP BY 1 "
        "ORDER BY images DESC, license",
    )
    for row in per_license:
        row["url"] = license_url(row["license"]) or ""
    per_holder = rows_of(
        home,
        """SELECT coalesce("rightsHolder", creator, '(not given)') AS rights_holder,
                  count(*) AS images,
                  string_agg(DISTINCT license, ', ' ORDER BY license) AS licenses
           FROM images GROUP BY ALL ORDER BY images DESC, rights_holder""",
    )
    per_publisher = rows_of(
        home,
        """SELECT "datasetKey" AS dataset_key, "publishingOrgKey" AS publishing_org_key,
                  count(*) AS images,
                  string_agg(DISTINCT license, ', ' ORDER BY license) AS licenses
           FROM images GROUP BY ALL ORDER BY images DESC, dataset_key""",
    )
    reports = home / "reports"
    files = [
        write_csv(reports / "licenses.csv", per_license).name,
        write_csv(reports / "rights_holders.csv", per_holder).name,
        write_csv(reports / "publishers.csv", per_publisher).name,
    ]
    warnings = []
    restricted = [
        r
        for r in per_license
        if any(f"-{k}" in r["license"] for k in RESTRICTED) or r["license"] in ("unknown", "all-rights-reserved")
    ]
    if restricted:
        warnings.append(
            "restrictive licences present: "
            + ", ".join(f"{r['license']} ({r['images']} images)" for r in restricted)
            + " - NC forbids commercial use, ND forbids adapted copies, "
            "unknown means ask the rights holder"
        )
    total = sum(r["images"] for r in per_license)
    md = "# Licences\n\n" + md_table(per_license) + "\n## Rights holders\n\n" + md_table(per_holder, 30)
    md += "\n## Publishers\n\n" + md_table(per_publisher, 30)
    if warnings:
        md += "\n**Warning:** " + warnings[0] + "\n"
    (reports / "licenses.md").write_text(md, encoding="utf-8")
    files.append("licenses.md")
    return LicenseReport(
        rows=total,
        per_license=per_license,
        per_rights_holder=per_holder[:50],
        per_publisher=per_publisher[:50],
        report_md=md[:20000],
        files=files,
        warnings=warnings,
    )


def attribution(home: Path) -> AttributionResult:
    """reports/attribution.csv: what CC BY asks for, one line per image."""
    rows = rows_of(
        home,
        """SELECT path, coalesce(title, 'GBIF occurrence ' || "gbifID") AS title,
                  coalesce(creator, "rightsHolder") AS creator, "rightsHolder" AS rights_holder,
                  coalesce("references", url) AS source_url, url AS media_url,
                  'https://www.gbif.org/occurrence/' || "gbifID" AS occurrence_url,
                  license, license_raw
           FROM images ORDER BY path""",
    )
    for row in rows:
        row["license_url"] = license_url(row["license"]) or ""
    path = write_csv(home / "reports" / "attribution.csv", rows, ATTRIBUTION_COLUMNS)
    missing = sum(1 for r in rows if not r["creator"])
    warnings = [f"{missing} image(s) name no creator or rights holder: credit the occurrence URL"] if missing else []
    return AttributionResult(rows=len(rows), path=path, missing_creator=missing, warnings=warnings)
