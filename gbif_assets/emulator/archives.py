"""Occurrence downloads built on demand: GBIF predicates evaluated on the pool, then DWCA or
SIMPLE_CSV zips in GBIF's real layout (meta.xml, tab-separated, no quoting, one header line).
"""

from __future__ import annotations

import datetime as dt
import zipfile
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from gbif_assets.emulator.pool import matches

PREDICATE_TYPES = {
    "and", "or", "not", "equals", "in", "greaterThan", "greaterThanOrEquals", "lessThan",
    "lessThanOrEquals", "isNotNull", "isNull", "like", "within", "geoDistance",
}  # fmt: skip
SPECIAL_KEYS = {"COUNTRY": "countryCode", "PUBLISHING_ORG": "publishingOrgKey", "GBIF_ID": "gbifID"}

DC = "http://purl.org/dc/terms/"
DWC = "http://rs.tdwg.org/dwc/terms/"
GBIF = "http://rs.gbif.org/terms/1.0/"

# today's occurrence.txt leads with these terms (a subset of GBIF's ~250 interpreted columns)
OCCURRENCE_TERMS = [
    (GBIF, "gbifID"), (DC, "accessRights"), (DC, "bibliographicCitation"), (DC, "language"),
    (DC, "license"), (DC, "modified"), (DC, "publisher"), (DC, "references"), (DC, "rightsHolder"),
    (DC, "type"), (DWC, "institutionCode"), (DWC, "collectionCode"), (DWC, "datasetName"),
    (DWC, "basisOfRecord"), (DWC, "informationWithheld"), (DWC, "occurrenceID"),
    (DWC, "catalogNumber"), (DWC, "recordNumber"), (DWC, "recordedBy"), (DWC, "individualCount"),
    (DWC, "sex"), (DWC, "lifeStage"), (DWC, "occurrenceStatus"), (DWC, "associatedMedia"),
    (DWC, "eventDate"), (DWC, "eventTime"), (DWC, "startDayOfYear"), (DWC, "endDayOfYear"),
    (DWC, "year"), (DWC, "month"), (DWC, "day"), (DWC, "verbatimEventDate"), (DWC, "habitat"),
    (DWC, "continent"), (DWC, "countryCode"), (DWC, "stateProvince"), (DWC, "county"),
    (DWC, "locality"), (DWC, "verbatimLocality"), (DWC, "decimalLatitude"),
    (DWC, "decimalLongitude"), (DWC, "coordinateUncertaintyInMeters"), (DWC, "identifiedBy"),
    (DWC, "dateIdentified"), (DWC, "taxonID"), (DWC, "scientificName"), (DWC, "kingdom"),
    (DWC, "phylum"), (DWC, "class"), (DWC, "order"), (DWC, "family"), (DWC, "genus"),
    (DWC, "specificEpithet"), (DWC, "infraspecificEpithet"), (DWC, "taxonRank"),
    (DWC, "taxonomicStatus"), (GBIF, "datasetKey"), (GBIF, "publishingCountry"),
    (GBIF, "lastInterpreted"), (GBIF, "elevation"), (GBIF, "depth"), (GBIF, "issue"),
    (GBIF, "mediaType"), (GBIF, "hasCoordinate"), (GBIF, "hasGeospatialIssues"),
    (GBIF, "taxonKey"), (GBIF, "acceptedTaxonKey"), (GBIF, "kingdomKey"), (GBIF, "phylumKey"),
    (GBIF, "classKey"), (GBIF, "orderKey"), (GBIF, "familyKey"), (GBIF, "genusKey"),
    (GBIF, "subgenusKey"), (GBIF, "speciesKey"), (GBIF, "species"), (GBIF, "acceptedScientificName"),
    (GBIF, "verbatimScientificName"), (GBIF, "typifiedName"), (GBIF, "protocol"),
    (GBIF, "lastParsed"), (GBIF, "lastCrawled"), (GBIF, "repatriated"),
    (GBIF, "publishingOrgKey"), (GBIF, "isSequenced"), (GBIF, "gbifRegion"),
    (GBIF, "publishedByGbifRegion"), (GBIF, "level0Gid"), (GBIF, "iucnRedListCategory"),
]  # fmt: skip
MULTIMEDIA_CURRENT = [
    "gbifID", "type", "format", "identifier", "references", "title", "description", "source",
    "audience", "created", "creator", "contributor", "publisher", "license", "rightsHolder",
]  # fmt: skip
MULTIMEDIA_2014 = [
    "gbifID", "type", "format", "identifier", "references", "title", "description", "created",
    "creator", "contributor", "publisher", "audience", "source", "license", "rightsHolder",
]  # fmt: skip
SIMPLE_CSV_COLUMNS = [
    "gbifID", "datasetKey", "occurrenceID", "kingdom", "phylum", "class", "order", "family",
    "genus", "species", "infraspecificEpithet", "taxonRank", "scientificName",
    "verbatimScientificName", "verbatimScientificNameAuthorship", "countryCode", "locality",
    "stateProvince", "occurrenceStatus", "individualCount", "publishingOrgKey", "decimalLatitude",
    "decimalLongitude", "coordinateUncertaintyInMeters", "coordinatePrecision", "elevation",
    "elevationAccuracy", "depth", "depthAccuracy", "eventDate", "day", "month", "year", "taxonKey",
    "speciesKey", "basisOfRecord", "institutionCode", "collectionCode", "catalogNumber",
    "recordNumber", "identifiedBy", "dateIdentified", "license", "rightsHolder", "recordedBy",
    "typeStatus", "establishmentMeans", "lastInterpreted", "mediaType", "issue",
]  # fmt: skip
LICENSE_ENUMS = {
    "creativecommons.org/publicdomain/zero/1.0": "CC0_1_0",
    "creativecommons.org/licenses/by/4.0": "CC_BY_4_0",
    "creativecommons.org/licenses/by-nc/4.0": "CC_BY_NC_4_0",
}


class PredicateError(ValueError):
    """A predicate GBIF would answer with HTTP 400."""


def field_of(key: str) -> str:
    """GBIF predicate key (SPECIES_KEY) to search-record field (speciesKey)."""
    if key in SPECIAL_KEYS:
        return SPECIAL_KEYS[key]
    words = key.lower().split("_")
    return words[0] + "".join(w.capitalize() for w in words[1:])


def validate(predicate: Any) -> None:
    """Raise PredicateError for what GBIF rejects: unknown types, missing keys or values."""
    if not isinstance(predicate, dict) or "type" not in predicate:
        raise PredicateError("Predicate must be an object with a 'type'")
    kind = predicate["type"]
    if kind not in PREDICATE_TYPES:
        raise PredicateError(f"Unknown predicate type '{kind}'")
    if kind in ("and", "or"):
        subs = predicate.get("predicates")
        if not isinstance(subs, list) or not subs:
            raise PredicateError(f"'{kind}' predicate needs a non-empty 'predicates' list")
        for sub in subs:
            validate(sub)
    elif kind == "not":
        validate(predicate.get("predicate"))
    elif kind in ("within", "geoDistance"):
        raise PredicateError(f"'{kind}' predicates are not supported by the emulator")
    else:
        key = predicate.get("key")
        if not isinstance(key, str) or not key.replace("_", "").isalnum() or key.upper() != key:
            raise PredicateError(f"Invalid search parameter key '{key}'")
        if kind == "in" and not isinstance(predicate.get("values"), list):
            raise PredicateError("'in' predicate needs a 'values' list")
        if kind not in ("in", "isNull", "isNotNull") and "value" not in predicate:
            raise PredicateError(f"'{kind}' predicate needs a 'value'")


def evaluate(predicate: dict[str, Any], record: dict[str, Any]) -> bool:
    """Does a record match a (validated) predicate?"""
    kind = predicate["type"]
    if kind == "and":
        return all(evaluate(p, record) for p in predicate["predicates"])
    if kind == "or":
        return any(evaluate(p, record) for p in predicate["predicates"])
    if kind == "not":
        return not evaluate(predicate["predicate"], record)
    field = field_of(predicate["key"])
    if kind == "equals":
        return matches(record, field, [str(predicate["value"])])
    if kind == "in":
        return matches(record, field, [str(v) for v in predicate["values"]])
    if kind == "isNotNull":
        return record.get(field) is not None
    if kind == "isNull":
        return record.get(field) is None
    value = record.get(field)
    if kind == "like":
        pattern = str(predicate["value"]).lower().replace("*", "")
        return value is not None and pattern in str(value).lower()
    if value is None:
        return False
    try:
        actual, bound = float(value), float(predicate["value"])
    except (TypeError, ValueError):
        return False
    return {
        "greaterThan": actual > bound,
        "greaterThanOrEquals": actual >= bound,
        "lessThan": actual < bound,
        "lessThanOrEquals": actual <= bound,
    }[kind]


def _clean(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        value = ";".join(str(v) for v in value)
    return str(value).replace("\t", " ").replace("\r", " ").replace("\n", " ")


def _occurrence_value(record: dict[str, Any], term: str) -> Any:
    if term == "license":
        text = str(record.get("license", ""))
        for fragment, enum in LICENSE_ENUMS.items():
            if fragment in text:
                return enum
        return text or None
    if term == "issue":
        return record.get("issues")
    if term == "mediaType":
        return sorted({m.get("type") for m in record.get("media", []) if m.get("type")})
    if term == "hasCoordinate":
        return str(record.get("decimalLatitude") is not None).lower()
    return record.get(term)


def _meta_xml(core_terms: list[tuple[str, str]], media_columns: list[str] | None) -> str:
    lines = [
        '<?xml version="1.0" encoding="utf-8"?>',
        '<archive xmlns="http://rs.tdwg.org/dwc/text/" metadata="metadata.xml">',
        '  <core encoding="UTF-8" fieldsTerminatedBy="\\t" linesTerminatedBy="\\n" fieldsEnclosedBy=""'
        ' ignoreHeaderLines="1" rowType="http://rs.tdwg.org/dwc/terms/Occurrence">',
        "    <files>",
        "      <location>occurrence.txt</location>",
        "    </files>",
        '    <id index="0" />',
    ]
    lines += [f'    <field index="{i}" term="{ns}{name}"/>' for i, (ns, name) in enumerate(core_terms)]
    lines.append("  </core>")
    if media_columns is not None:
        lines += [
            '  <extension encoding="UTF-8" fieldsTerminatedBy="\\t" linesTerminatedBy="\\n"'
            ' fieldsEnclosedBy="" ignoreHeaderLines="1" rowType="http://rs.gbif.org/terms/1.0/Multimedia">',
            "    <files>",
            "      <location>multimedia.txt</location>",
            "    </files>",
            '    <coreid index="0" />',
        ]
        for i, name in enumerate(media_columns):
            ns = GBIF if name == "gbifID" else DC
            lines.append(f'    <field index="{i}" term="{ns}{name}"/>')
        lines.append("  </extension>")
    lines.append("</archive>")
    return "\n".join(lines) + "\n"


def _eml(key: str, doi: str, title: str) -> str:
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<eml:eml xmlns:eml="eml://ecoinformatics.org/eml-2.1.1" packageId="' + escape(key) + '">\n'
        f"  <dataset><alternateIdentifier>{escape(doi)}</alternateIdentifier>"
        f"<title>{escape(title)}</title></dataset>\n</eml:eml>\n"
    )


def build_archive(
    path: Path,
    key: str,
    doi: str,
    records: list[dict[str, Any]],
    fmt: str = "DWCA",
    media_layout: str = "current",
    with_multimedia: bool = True,
) -> int:
    """Write a download zip to `path`; returns the number of occurrence rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        if fmt == "SIMPLE_CSV":
            rows = ["\t".join(SIMPLE_CSV_COLUMNS)]
            rows += ["\t".join(_clean(_occurrence_value(r, c)) for c in SIMPLE_CSV_COLUMNS) for r in records]
            archive.writestr(f"{key}.csv", "\n".join(rows) + "\n")
        else:
            terms = [t for _, t in OCCURRENCE_TERMS]
            occ = ["\t".join(terms)]
            occ += ["\t".join(_clean(_occurrence_value(r, t)) for t in terms) for r in records]
            archive.writestr("occurrence.txt", "\n".join(occ) + "\n")
            verbatim_terms = ["gbifID", "scientificName", "eventDate", "recordedBy", "license"]
            verbatim = ["\t".join(verbatim_terms)]
            verbatim += ["\t".join(_clean(r.get(t)) for t in verbatim_terms) for r in records]
            archive.writestr("verbatim.txt", "\n".join(verbatim) + "\n")
            columns = MULTIMEDIA_2014 if media_layout == "2014" else MULTIMEDIA_CURRENT
            if with_multimedia:
                media = ["\t".join(columns)]
                for r in records:
                    for item in r.get("media", []):
                        values = {**item, "gbifID": r["gbifID"]}
                        media.append("\t".join(_clean(values.get(c)) for c in columns))
                archive.writestr("multimedia.txt", "\n".join(media) + "\n")
            archive.writestr("meta.xml", _meta_xml(OCCURRENCE_TERMS, columns if with_multimedia else None))
            datasets = sorted({r.get("datasetKey") for r in records if r.get("datasetKey")})
            archive.writestr("metadata.xml", _eml(key, doi, f"GBIF Occurrence Download {key}"))
            for dataset in datasets:
                archive.writestr(f"dataset/{dataset}.xml", _eml(dataset, "", f"Dataset {dataset}"))
            today = dt.date.today().isoformat()
            archive.writestr(
                "citations.txt",
                "When using this dataset please use the following citation:\n"
                f"GBIF.org ({today}) GBIF Occurrence Download https://doi.org/{doi}\n",
            )
            archive.writestr(
                "rights.txt",
                "".join(f"Dataset: {d}\nRights as supplied: CC BY-NC 4.0\n\n" for d in datasets),
            )
    tmp.replace(path)
    return len(records)
