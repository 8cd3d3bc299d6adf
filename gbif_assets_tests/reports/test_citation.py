"""Citation: download DOI, derived-dataset request for search mode, CFF and BibTeX files."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import DS_A, DS_B

from gbif_assets.reports.citation import derived_dataset_request, write_citation

# GBIF's answer to GET /occurrence/download/{key}/citation (recorded by pygbif), newline included.
GBIF_TEXT = "GBIF.org (2 January 2023) GBIF Occurrence Download https://doi.org/10.15468/dl.29wbtx\n"
# Answer of POST /derivedDataset (recorded by rgbif).
DERIVED_ANSWER = {
    "doi": "10.15468/dd.cam6mk",
    "citation": "Derived dataset GBIF.org (4 September 2025) Filtered export of GBIF occurrence "
    "data https://doi.org/10.15468/dd.cam6mk",
    "title": "Test for derived dataset",
}


def _check_cff(path: Path) -> dict:
    """The keys CFF 1.2.0 requires, with the types its schema asks for."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert doc["cff-version"] == "1.2.0"
    assert isinstance(doc["message"], str) and doc["message"]
    assert isinstance(doc["title"], str) and doc["title"]
    assert doc["authors"] == [{"name": "GBIF.org"}]
    assert doc["type"] == "dataset"
    assert isinstance(doc["date-released"], dt.date)
    if "doi" in doc:
        assert re.fullmatch(r"10\.\d{4,9}/[-._;()/:A-Za-z0-9]+", doc["doi"])
        assert doc["identifiers"] == [{"type": "doi", "value": doc["doi"]}]
    return doc


def _check_bib(path: Path) -> dict[str, str]:
    """One @misc entry with balanced braces; returns its fields."""
    text = path.read_text(encoding="utf-8")
    depth = 0
    for ch in text:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0 and text.startswith("@misc{")
    return dict(re.findall(r"^  (\w+) = \{(.*)\},?$", text, flags=re.M))


def test_download_mode_cites_the_doi_with_gbif_text(tmp_path: Path) -> None:
    result = write_citation(tmp_path, "invasive_plants", "download", "10.15468/dl.29wbtx", GBIF_TEXT)
    assert result.doi == "10.15468/dl.29wbtx" and result.warnings == []
    cff = _check_cff(tmp_path / "reports" / "CITATION.cff")
    assert cff["message"] == GBIF_TEXT.strip() and cff["doi"] == "10.15468/dl.29wbtx"
    bib = _check_bib(tmp_path / "reports" / "citation.bib")
    assert bib["doi"] == "10.15468/dl.29wbtx" and bib["author"] == "{GBIF.org}"
    assert bib["note"] == GBIF_TEXT.strip()
    md = (tmp_path / "reports" / "citation.md").read_text(encoding="utf-8")
    assert "> " + GBIF_TEXT.strip() in md and "(https://doi.org/10.15468/dl.29wbtx)" in md


def test_awkward_citation_text_stays_valid(tmp_path: Path) -> None:
    text = 'GBIF.org: "quoted" {braces} 50% & #tags_x\\ end'
    write_citation(tmp_path, "x", "download", "10.15468/dl.abc", text)
    assert _check_cff(tmp_path / "reports" / "CITATION.cff")["message"] == text
    assert "50\\% \\& \\#tags\\_x" in _check_bib(tmp_path / "reports" / "citation.bib")["note"]


def test_download_without_doi_warns(tmp_path: Path) -> None:
    result = write_citation(tmp_path, "x", "existing", None, None)
    assert result.warnings == ["existing mode: no download DOI known yet; the citation names GBIF.org without a DOI"]
    assert "doi" not in _check_cff(tmp_path / "reports" / "CITATION.cff")


def test_derived_dataset_request_counts_kept_images(merged: Path) -> None:
    body = derived_dataset_request(merged, "plants", "https://www.gbif.org/occurrence/search?taxonKey=1", "desc")
    # The recorded rgbif request has exactly these keys; counts are of kept images (no duplicate).
    assert body == {
        "title": "plants",
        "sourceUrl": "https://www.gbif.org/occurrence/search?taxonKey=1",
        "relatedDatasets": {DS_B: 4, DS_A: 5},
        "description": "desc",
    }


def test_search_mode_registered_and_unregistered(merged: Path) -> None:
    body = derived_dataset_request(merged, "plants", "https://www.gbif.org/occurrence/search", None)
    pending = write_citation(merged, "plants", "search", None, None, derived_request=body)
    assert pending.doi is None and pending.related_datasets == 2
    assert "register the derived dataset" in pending.warnings[0]
    # GBIF's own date style, as in every other citation it gives ("30 November 2026")
    assert re.search(r"> GBIF\.org \(\d{1,2} [A-Z][a-z]+ \d{4}\) GBIF Occurrence Data, plants", pending.citation_md)
    assert json.loads((merged / "reports" / "derived_dataset_request.json").read_text()) == body
    _check_cff(merged / "reports" / "CITATION.cff")
    done = write_citation(merged, "plants", "search", None, None, derived_request=body, derived_answer=DERIVED_ANSWER)
    assert done.doi == "10.15468/dd.cam6mk" and done.warnings == []
    cff = _check_cff(merged / "reports" / "CITATION.cff")
    assert cff["message"] == DERIVED_ANSWER["citation"] and cff["doi"] == "10.15468/dd.cam6mk"
    assert _check_bib(merged / "reports" / "citation.bib")["doi"] == "10.15468/dd.cam6mk"


def test_search_mode_without_request_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="search mode needs the derived-dataset request"):
        write_citation(tmp_path, "x", "search", None, None)
    assert not (tmp_path / "reports").exists()
