"""Citation: the download DOI (download and existing modes) or a GBIF derived dataset (search mode).

GBIF asks users of search-API data to register a derived dataset: which datasets contributed how
many records. The request body is built from the images actually kept.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gbif_assets.reports.metadata import rows_of


@dataclass
class CitationResult:
    """The citation text and DOI, and the files written."""

    mode: str
    doi: str | None
    citation_md: str
    related_datasets: int
    files: list[str]
    warnings: list[str] = field(default_factory=list)


def derived_dataset_request(
    home: Path,
    title: str,
    source_url: str,
    description: str | None,
    original_doi: str | None = None,
) -> dict[str, Any]:
    """POST /derivedDataset body: datasetKey -> number of occurrence records used (GBIF counts
    records, and an occurrence may give the set several images)."""
    counts = rows_of(
        home,
        'SELECT "datasetKey" AS k, count(DISTINCT "gbifID") AS n FROM images WHERE "datasetKey" IS NOT NULL '
        "GROUP BY k ORDER BY k",
    )
    body: dict[str, Any] = {
        "title": title,
        "sourceUrl": source_url,
        "relatedDatasets": {r["k"]: int(r["n"]) for r in counts},
    }
    if description:
        body["description"] = description
    if original_doi:
        body["originalDownloadDOI"] = original_doi
    return body


def _cff(title: str, doi: str | None, citation_text: str, today: str) -> str:
    """CITATION.cff 1.2.0, dumped by a YAML library so any citation text stays valid YAML."""
    doc: dict[str, Any] = {
        "cff-version": "1.2.0",
        "message": citation_text,
        "type": "dataset",
        "title": title,
        "authors": [{"name": "GBIF.org"}],
        "date-released": dt.date.fromisoformat(today),
    }
    if doi:
        doc.update(doi=doi, url=f"https://doi.org/{doi}", identifiers=[{"type": "doi", "value": doi}])
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def _bib_escape(text: str) -> str:
    """BibTeX-safe text: braces balanced away and LaTeX specials escaped."""
    text = text.replace("\\", " ").replace("{", "(").replace("}", ")")
    return re.sub(r"([%&#$_])", r"\\\1", text)


def _bib(key: str, title: str, doi: str | None, year: int, note: str) -> str:
    fields = [
        "  author = {{GBIF.org}}",
        f"  title = {{{_bib_escape(title)}}}",
        f"  year = {{{year}}}",
        "  publisher = {GBIF}",
    ]
    if doi:
        fields += [f"  doi = {{{doi}}}", f"  url = {{https://doi.org/{doi}}}"]
    fields.append(f"  note = {{{_bib_escape(note)}}}")
    return f"@misc{{{re.sub(r'[^A-Za-z0-9_:-]', '_', key)},\n" + ",\n".join(fields) + "\n}\n"


MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip


def _gbif_date(day: dt.date) -> str:
    """GBIF's citation style, "30 November 2026", whatever the machine's locale."""
    return f"{day.day} {MONTHS[day.month - 1]} {day.year}"


def write_citation(
    home: Path,
    name: str,
    mode: str,
    doi: str | None,
    citation_text: str | None,
    derived_request: dict[str, Any] | None = None,
    derived_answer: dict[str, Any] | None = None,
) -> CitationResult:
    """reports/CITATION.cff, citation.bib and citation.md (and the derived-dataset request)."""
    reports = home / "reports"
    today = dt.date.today()
    warnings: list[str] = []
    files = ["CITATION.cff", "citation.bib", "citation.md"]
    related = 0
    if mode == "search" and derived_request is None:
        raise ValueError("citation: search mode needs the derived-dataset request (derived_dataset_request(...))")
    reports.mkdir(parents=True, exist_ok=True)
    if mode != "search" and not doi:
        warnings.append(f"{mode} mode: no download DOI known yet; the citation names GBIF.org without a DOI")
    if mode == "search":
        related = len(derived_request["relatedDatasets"])
        (reports / "derived_dataset_request.json").write_text(json.dumps(derived_request, indent=2), encoding="utf-8")
        files.append("derived_dataset_request.json")
        if derived_answer:
            doi = derived_answer.get("doi")
            citation_text = (
                derived_answer.get("citation")
                or f"Derived dataset GBIF.org ({_gbif_date(today)}) https://doi.org/{doi}"
            )
            (reports / "derived_dataset.json").write_text(json.dumps(derived_answer, indent=2), encoding="utf-8")
            files.append("derived_dataset.json")
        else:
            citation_text = (
                f"GBIF.org ({_gbif_date(today)}) GBIF Occurrence Data, {name} (derived dataset not yet registered)"
            )
            warnings.append(
                "search mode: register the derived dataset "
                "(set GBIF_USERNAME/GBIF_PASSWORD and rebuild `citation`) "
                "to get a DOI; the request is in reports/derived_dataset_request.json"
            )
    title = f"{name}: image training set from GBIF occurrence media"
    fallback = f"GBIF.org ({_gbif_date(today)}) GBIF Occurrence Download" + (f" https://doi.org/{doi}" if doi else "")
    text = " ".join((citation_text or fallback).split())
    (reports / "CITATION.cff").write_text(_cff(title, doi, text, today.isoformat()), encoding="utf-8")
    (reports / "citation.bib").write_text(_bib(f"gbif_{name}", title, doi, today.year, text), encoding="utf-8")
    md = f"# How to cite {name}\n\n> {text}\n\n"
    if doi:
        md += f"DOI: [{doi}](https://doi.org/{doi})\n\n"
    md += "Images keep the licences listed in `attribution.csv`; credit each creator as the licence asks.\n"
    (reports / "citation.md").write_text(md, encoding="utf-8")
    return CitationResult(mode=mode, doi=doi, citation_md=md, related_datasets=related, files=files, warnings=warnings)
