"""The emulator's occurrence pool: real GBIF records from the recordings plus seeded synthetic ones.

Records keep GBIF's occurrence-search JSON shape exactly (`key` int, `gbifID` str, `media[]`).
Media URLs are rewritten to the emulator's publisher image hosts, spread over fault profiles by
weight, so every downloader test meets the same mix of healthy and broken hosts.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import random
import zipfile
from collections.abc import Iterable, Iterator
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

DATA = resources.files("gbif_assets.emulator") / "data"

SEARCH_FIXTURES = (
    "pygbif_test_search_key2.json",
    "pygbif_test_search_identified_by_id.json",
    "rgbif_occ_search_datasetkey.json",
    "rgbif_occ_search_speciesKey.json",
)
ARCHIVE_2014 = "dwca-0000066-140928181241064.zip"

# the gbif-dl README example: 3 species x 2 datasets
EXAMPLE_SPECIES = {
    5352251: (
        "Ailanthus altissima (Mill.) Swingle",
        "Ailanthus altissima",
        3190638,
        "Simaroubaceae",
        6679,
    ),
    3190653: (
        "Fallopia japonica (Houtt.) Ronse Decr.",
        "Fallopia japonica",
        3190636,
        "Polygonaceae",
        2416,
    ),
    3189866: (
        "Heracleum mantegazzianum Sommier & Levier",
        "Heracleum mantegazzianum",
        3034825,
        "Apiaceae",
        6720,
    ),
}
EXAMPLE_DATASETS = {
    "7a3679ef-5582-4aaa-81f0-8c2545cafc81": (
        "bb646dff-a905-4403-a49b-6d378c2cf0d9",
        "Pl@ntNet observations",
    ),
    "50c9509d-22c7-4a22-a47d-8c48425ef4a7": (
        "28eb1a3f-1c15-4a95-931a-4af90ecb574d",
        "iNaturalist Research-grade Observations",
    ),
}
# real media licence strings seen in the recordings, with rough real frequencies
MEDIA_LICENSES = (
    ("http://creativecommons.org/licenses/by-nc/4.0/", 40),
    ("http://creativecommons.org/licenses/by/4.0/", 20),
    ("http://creativecommons.org/publicdomain/zero/1.0/", 10),
    ("https://creativecommons.org/licenses/by-sa/4.0/", 5),
    ("CC BY-NC 4.0", 5),
    ("http://creativecommons.org/licenses/by-nc-nd/4.0/", 4),
    ("All rights reserved", 4),
    (None, 4),
)
TAXON_FIELDS = (
    "kingdomKey", "phylumKey", "classKey", "orderKey", "familyKey", "genusKey", "subgenusKey",
    "speciesKey", "taxonKey", "acceptedTaxonKey",
)  # fmt: skip
PARAM_ALIASES = {"country": "countryCode", "publishingOrg": "publishingOrgKey"}


def _weighted(rng: random.Random, options: tuple[tuple[Any, int], ...]) -> Any:
    values, weights = zip(*options, strict=True)
    return rng.choices(values, weights=weights)[0]


def load_recorded_records() -> list[dict[str, Any]]:
    """Every occurrence record in the recorded searches, de-duplicated by key."""
    seen: dict[int, dict[str, Any]] = {}
    for name in SEARCH_FIXTURES:
        exchanges = json.loads((DATA / "recorded" / name).read_text(encoding="utf-8"))
        for exchange in exchanges:
            body = exchange["response"].get("body")
            if isinstance(body, dict):
                for record in body.get("results", []):
                    seen.setdefault(int(record["key"]), record)
    return list(seen.values())


def load_archive_records() -> list[dict[str, Any]]:
    """Occurrences and media of the real 2014 DwC-A, turned into search-API shaped records."""
    path = DATA / "archives" / ARCHIVE_2014
    with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as archive:
        occ_rows = _tsv(archive.read("occurrence.txt"))
        media_rows = _tsv(archive.read("multimedia.txt"))
    media: dict[str, list[dict[str, Any]]] = {}
    for row in media_rows:
        item = {k: v for k, v in row.items() if v and k != "gbifID"}
        media.setdefault(row["gbifID"], []).append(item)
    records = []
    for row in occ_rows:
        record: dict[str, Any] = {k: v for k, v in row.items() if v}
        for key in (*TAXON_FIELDS, "year", "month", "day"):
            if key in record and str(record[key]).isdigit():
                record[key] = int(record[key])
        for key in ("decimalLatitude", "decimalLongitude"):
            if key in record:
                try:
                    record[key] = float(record[key])
                except ValueError:
                    record.pop(key)
        record["key"] = int(row["gbifID"])
        record["gbifID"] = row["gbifID"]
        record["media"] = media.get(row["gbifID"], [])
        records.append(record)
    return records


def _tsv(data: bytes) -> list[dict[str, str]]:
    text = data.decode("utf-8")
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader)
    return [dict(zip(header, row, strict=False)) for row in reader if row]


def synthetic_example_records(per_stream: int, seed: int = 0, start_key: int = 9_000_000_000) -> list[dict[str, Any]]:
    """Records for the gbif-dl README example (species x datasets), shaped like real ones."""
    rng = random.Random(seed)
    records = []
    key = start_key
    for species_key, (sci, species, genus_key, family, family_key) in EXAMPLE_SPECIES.items():
        for dataset_key, (org_key, dataset_name) in EXAMPLE_DATASETS.items():
            for _ in range(per_stream):
                key += 1
                year = 2015 + rng.randrange(10)
                record = {
                    "key": key,
                    "gbifID": str(key),
                    "datasetKey": dataset_key,
                    "publishingOrgKey": org_key,
                    "datasetName": dataset_name,
                    "basisOfRecord": "HUMAN_OBSERVATION",
                    "occurrenceStatus": "PRESENT",
                    "kingdomKey": 6,
                    "phylumKey": 7707728,
                    "classKey": 220,
                    "familyKey": family_key,
                    "genusKey": genus_key,
                    "speciesKey": species_key,
                    "taxonKey": species_key,
                    "acceptedTaxonKey": species_key,
                    "scientificName": sci,
                    "species": species,
                    "family": family,
                    "kingdom": "Plantae",
                    "countryCode": rng.choice(["FR", "DE", "US", "GB", "ES", "IT"]),
                    "decimalLatitude": round(rng.uniform(35, 60), 5),
                    "decimalLongitude": round(rng.uniform(-10, 20), 5),
                    "year": year,
                    "month": 1 + rng.randrange(12),
                    "eventDate": f"{year}-{1 + rng.randrange(12):02d}-{1 + rng.randrange(28):02d}",
                    "license": "http://creativecommons.org/licenses/by-nc/4.0/legalcode",
                    "recordedBy": f"Observer {rng.randrange(500)}",
                    "rightsHolder": f"Observer {rng.randrange(500)}",
                    "issues": [],
                    "media": [],
                }
                for m in range(1 + (rng.random() < 0.4) + (rng.random() < 0.2)):
                    photo = key * 10 + m
                    lic = _weighted(rng, MEDIA_LICENSES)
                    item = {
                        "type": "StillImage",
                        "format": "image/jpeg",
                        "identifier": f"https://photos.example.org/{dataset_key[:8]}/{photo}/original.jpg",
                        "references": f"https://observations.example.org/photos/{photo}",
                        "created": f"{year}-01-01T00:00:00.000+00:00",
                        "creator": record["recordedBy"],
                        "publisher": dataset_name,
                        "rightsHolder": record["rightsHolder"],
                    }
                    if lic is not None:
                        item["license"] = lic
                    record["media"].append(item)
                records.append(record)
    return records


def bulk_records(count: int, species_key: int = 8_000_001, start_key: int = 7_000_000_000) -> Iterator[dict[str, Any]]:
    """Cheap minimal records for scale tests (the 100,000 offset limit)."""
    for i in range(count):
        key = start_key + i
        yield {
            "key": key,
            "gbifID": str(key),
            "datasetKey": "00000000-0000-0000-0000-00000000000" + str(i % 3),
            "publishingOrgKey": "00000000-0000-0000-0000-000000000010",
            "speciesKey": species_key,
            "taxonKey": species_key,
            "kingdomKey": 1,
            "year": 1990 + i % 30,
            "basisOfRecord": "HUMAN_OBSERVATION",
            "media": [
                {
                    "type": "StillImage",
                    "format": "image/jpeg",
                    "identifier": f"https://bulk.example.org/{key}.jpg",
                    "license": "http://creativecommons.org/publicdomain/zero/1.0/",
                }
            ],
        }


def _host_for(url: str, weights: dict[str, int]) -> str:
    digest = int(hashlib.sha1(url.encode()).hexdigest()[:8], 16)
    total = sum(weights.values())
    point = digest % total
    for name, weight in sorted(weights.items()):
        if point < weight:
            return name
        point -= weight
    raise AssertionError("unreachable")


def rewrite_media(records: Iterable[dict[str, Any]], base_urls: dict[str, str], weights: dict[str, int]) -> None:
    """Point each media identifier at an emulator image host, keeping the original host in the path."""
    weights = {k: v for k, v in weights.items() if k in base_urls and v > 0}
    if not weights:
        return
    for record in records:
        for item in record.get("media", []):
            original = item.get("identifier")
            if not original or "original_identifier" in item:
                continue
            parts = urlsplit(original)
            host = _host_for(original, weights)
            item["identifier"] = f"{base_urls[host]}/{parts.netloc}{parts.path}"
            item["original_identifier"] = original


def md5_hex(text: str) -> str:
    """GBIF's image-cache key of a media identifier."""
    return hashlib.md5(text.encode("utf-8")).hexdigest()


class OccurrencePool:
    """The records the emulator serves; mutable at runtime for refresh tests."""

    def __init__(self, records: Iterable[dict[str, Any]] = ()) -> None:
        self._records: dict[str, dict[str, Any]] = {}
        self.add(records)

    def __len__(self) -> int:
        return len(self._records)

    def add(self, records: Iterable[dict[str, Any]]) -> int:
        """Add or replace records by gbifID; returns how many were given."""
        n = 0
        for record in records:
            self._records[str(record.get("gbifID") or record["key"])] = record
            n += 1
        return n

    def remove(self, gbif_ids: Iterable[str | int]) -> int:
        """Remove records (they "left GBIF"); returns how many existed."""
        return sum(self._records.pop(str(g), None) is not None for g in gbif_ids)

    def get(self, gbif_id: str) -> dict[str, Any] | None:
        """One record by gbifID."""
        return self._records.get(str(gbif_id))

    def records(self) -> list[dict[str, Any]]:
        """All records in key order (GBIF pages in a stable order)."""
        return sorted(self._records.values(), key=lambda r: int(r["key"]))

    def media_identifier(self, gbif_id: str, md5: str) -> str | None:
        """The media URL of an occurrence whose md5 matches (the image-cache lookup)."""
        record = self.get(gbif_id)
        for item in (record or {}).get("media", []):
            identifier = item.get("identifier")
            if identifier and md5 in (
                md5_hex(identifier),
                md5_hex(item.get("original_identifier", "")),
            ):
                return identifier
        return None

    def search(self, filters: dict[str, list[str]]) -> list[dict[str, Any]]:
        """Records matching search filters: values of one parameter OR'd, parameters AND'd."""
        return [r for r in self.records() if all(matches(r, f, v) for f, v in filters.items())]

    def snapshot(self) -> list[dict[str, Any]]:
        """A deep copy, for archives that must not change when the pool does."""
        return copy.deepcopy(self.records())


def matches(record: dict[str, Any], field: str, values: list[str]) -> bool:
    field = PARAM_ALIASES.get(field, field)
    if field == "taxonKey":
        keys = {str(record.get(k)) for k in TAXON_FIELDS if record.get(k) is not None}
        return any(v in keys for v in values)
    if field == "mediaType":
        types = {str(m.get("type", "")).lower() for m in record.get("media", [])}
        return any(v.lower() in types for v in values)
    actual = record.get(field)
    if actual is None:
        return False
    for value in values:
        if "," in value and isinstance(actual, int | float):
            low, _, high = value.partition(",")
            if (low in ("", "*") or actual >= float(low)) and (high in ("", "*") or actual <= float(high)):
                return True
        elif str(actual).lower() == value.lower():
            return True
    return False


def facet_counts(records: list[dict[str, Any]], field: str) -> dict[str, int]:
    """Value counts of one field (GBIF facets), media types counted per record."""
    counts: dict[str, int] = {}
    field = PARAM_ALIASES.get(field, field)
    for record in records:
        if field == "mediaType":
            values = {m.get("type") for m in record.get("media", []) if m.get("type")}
        else:
            value = record.get(field)
            values = {value} if value is not None else set()
        for value in values:
            counts[str(value)] = counts.get(str(value), 0) + 1
    return counts
