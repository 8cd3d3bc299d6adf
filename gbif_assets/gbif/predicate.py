"""Recipe queries to GBIF download predicates and search parameters.

pygbif does the pure part (its `GbifDownload` predicate builder and its field-name table); its
network functions are never called, since they hard-code GBIF's hosts.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from pygbif.occurrences.download import GbifDownload, key_lkup

# where GBIF's real predicate keys differ from pygbif's table
KEY_FIXES = {
    "publishingOrgKey": "PUBLISHING_ORG",
    "countryCode": "COUNTRY",
    "mediaType": "MEDIA_TYPE",
    "gbifID": "GBIF_ID",
}
# occurrence search parameters beyond pygbif's table (GBIF's OccurrenceSearchParameter), to tell a
# typo ("speciesKeyy") from a field gbif-assets has not heard of, which is passed on as given
MORE_SEARCH_FIELDS = {
    "acceptedTaxonKey", "countryCode", "day", "degreeOfEstablishment", "dwcaExtension", "endDayOfYear",
    "eventDateGte", "gadmGid", "gadmLevel0Gid", "gadmLevel1Gid", "gadmLevel2Gid", "gadmLevel3Gid",
    "gbifId", "gbifRegion", "georeferencedBy", "hostingOrganizationKey", "installationKey",
    "institutionKey", "collectionKey", "isInCluster", "isSequenced", "iucnRedListCategory",
    "lifeStage", "mediaType", "parentEventId", "pathway", "previousIdentifications",
    "publishedByGbifRegion", "sex", "startDayOfYear", "taxonomicStatus", "verbatimTaxonId",
    "higherGeography", "island", "islandGroup", "fieldNumber", "checklistKey", "taxonConceptId",
}  # fmt: skip
SEARCH_FIELDS = frozenset(key_lkup) | frozenset(KEY_FIXES) | MORE_SEARCH_FIELDS
# fields of an occurrence record a recipe may label or balance by, beyond the search parameters
RECORD_FIELDS = SEARCH_FIELDS | {
    "species", "genus", "family", "order", "class", "phylum", "kingdom", "acceptedScientificName",
    "genericName", "specificEpithet", "taxonRank", "lifeStage", "sex", "occurrenceStatus", "countryCode",
    "stateProvince", "recordedBy", "institutionCode", "collectionCode", "year", "month", "basisOfRecord",
    "publishingOrgKey", "datasetKey", "speciesKey", "acceptedTaxonKey", "taxonKey", "iucnRedListCategory",
}  # fmt: skip


def typo_of(field: str, known: frozenset[str] | set[str] = SEARCH_FIELDS) -> str | None:
    """The known field that `field` misspells, or None (known, or unknown but not close)."""
    if field in known:
        return None
    folded = {f.lower(): f for f in known}
    if field.lower() in folded:
        return folded[field.lower()]
    close = difflib.get_close_matches(field, known, n=1, cutoff=0.85)
    return close[0] if close else None


COMPARISONS = {
    "equals",
    "greaterThan",
    "greaterThanOrEquals",
    "lessThan",
    "lessThanOrEquals",
    "like",
}
TYPES = COMPARISONS | {"and", "or", "not", "in", "isNull", "isNotNull", "within", "geoDistance"}
KEY_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")


def predicate_key(field: str) -> str:
    """GBIF predicate key of an occurrence field: speciesKey -> SPECIES_KEY."""
    if field in KEY_FIXES:
        return KEY_FIXES[field]
    if field in key_lkup:
        return key_lkup[field]
    return re.sub(r"(?<!^)(?=[A-Z])", "_", field).upper()


def query_to_predicate(query: dict[str, list[Any]]) -> dict[str, Any]:
    """AND across fields, IN (OR) within a field, always StillImage media only."""
    builder = GbifDownload(creator="gbif-assets", email="unused@example.org")
    for field, values in query.items():
        key = predicate_key(field)
        strings = [str(v) for v in values]
        if len(strings) == 1:
            builder.add_predicate_dict({"type": "equals", "key": key, "value": strings[0]})
        else:
            builder.add_predicate_dict({"type": "in", "key": key, "values": strings})
    if "mediaType" not in query:
        builder.add_predicate_dict({"type": "equals", "key": "MEDIA_TYPE", "value": "StillImage"})
    return builder.payload["predicate"]


def query_to_search_params(query: dict[str, list[Any]]) -> list[tuple[str, str]]:
    """Occurrence-search parameters: repeated parameters are OR'd by GBIF, different ones AND'd."""
    params = [(field, str(v)) for field, values in query.items() for v in values]
    if "mediaType" not in query:
        params.append(("mediaType", "StillImage"))
    return params


def validate_predicate(predicate: Any, path: str = "predicate") -> None:
    """Reject what GBIF would answer with HTTP 400, naming where the problem is."""
    if not isinstance(predicate, dict):
        raise ValueError(f"{path}: must be a mapping with a 'type', got {type(predicate).__name__}")
    kind = predicate.get("type")
    if kind not in TYPES:
        raise ValueError(f"{path}.type: {kind!r} is not a GBIF predicate type; allowed: {', '.join(sorted(TYPES))}")
    if kind in ("and", "or"):
        subs = predicate.get("predicates")
        if not isinstance(subs, list) or not subs:
            raise ValueError(f"{path}.predicates: '{kind}' needs a non-empty list of predicates")
        for i, sub in enumerate(subs):
            validate_predicate(sub, f"{path}.predicates[{i}]")
        return
    if kind == "not":
        validate_predicate(predicate.get("predicate"), f"{path}.predicate")
        return
    if kind == "within":
        if not isinstance(predicate.get("geometry"), str):
            raise ValueError(f"{path}.geometry: 'within' needs a WKT geometry string")
        return
    if kind == "geoDistance":
        for name in ("latitude", "longitude", "distance"):
            if name not in predicate:
                raise ValueError(f"{path}.{name}: 'geoDistance' needs latitude, longitude and distance")
        return
    key = (
        predicate.get("key")
        if kind not in ("isNull", "isNotNull")
        else predicate.get("parameter", predicate.get("key"))
    )
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ValueError(f"{path}.key: {key!r} is not a GBIF search parameter (like SPECIES_KEY)")
    if kind == "in":
        values = predicate.get("values")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}.values: 'in' needs a non-empty list")
    elif kind in COMPARISONS and "value" not in predicate:
        raise ValueError(f"{path}.value: '{kind}' needs a value")
