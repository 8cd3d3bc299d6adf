"""Recipe queries to GBIF download predicates and search parameters.

pygbif does the pure part (its `GbifDownload` predicate builder and its field-name table); its
network functions are never called, since they hard-code GBIF's hosts.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
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
# every field of a GBIF occurrence record, which a recipe may label or balance by: the interpreted
# occurrence.txt columns of a DwC-A download (the 2014 fixture's meta.xml), the SIMPLE_CSV columns
# (2020 and 2025 fixtures), the fields of occurrence-search results (recorded responses) and the
# fields GBIF added since (GADM levels, recordedByID, checklistKey...). Not the search parameters
# that are no field of a record (geometry, eventDateGte...), nor mediaType (no class: a record has
# several), which would pass the recipe's check and fail at build.
RECORD_FIELDS = frozenset({
    "abstract", "acceptedNameUsage", "acceptedNameUsageID", "acceptedScientificName", "acceptedTaxonKey",
    "accessRights", "accrualMethod", "accrualPeriodicity", "accrualPolicy", "alternative",
    "associatedOccurrences", "associatedOrganisms", "associatedReferences", "associatedSequences",
    "associatedTaxa", "audience", "available", "basisOfRecord", "bed", "behavior", "bibliographicCitation",
    "caste", "catalogNumber", "checklistKey", "class", "classKey", "collectionCode", "collectionID",
    "collectionKey", "conformsTo", "continent", "contributor", "coordinateAccuracy", "coordinatePrecision",
    "coordinateUncertaintyInMeters", "country", "countryCode", "county", "coverage", "created", "creator",
    "cultivarEpithet", "dataGeneralizations", "datasetID", "datasetKey", "datasetName", "datasetTitle", "date",
    "dateAccepted", "dateCopyrighted", "dateIdentified", "dateSubmitted", "day", "decimalLatitude",
    "decimalLongitude", "degreeOfEstablishment", "depth", "depthAccuracy", "description", "disposition",
    "distanceAboveSurface", "distanceAboveSurfaceAccuracy", "distanceFromCentroidInMeters", "dnaSequenceID",
    "dynamicProperties", "earliestAgeOrLowestStage", "earliestEonOrLowestEonothem",
    "earliestEpochOrLowestSeries", "earliestEraOrLowestErathem", "earliestPeriodOrLowestSystem",
    "educationLevel", "elevation", "elevationAccuracy", "endDayOfYear", "establishmentMeans", "eventDate",
    "eventID", "eventRemarks", "eventTime", "eventType", "extent", "family", "familyKey", "fieldNotes",
    "fieldNumber", "footprintSpatialFit", "footprintSRS", "footprintWKT", "format", "formation", "gbifID",
    "gbifRegion", "genericName", "genus", "genusKey", "geodeticDatum", "geologicalContextID", "georeferencedBy",
    "georeferencedDate", "georeferenceProtocol", "georeferenceRemarks", "georeferenceSources",
    "georeferenceVerificationStatus", "group", "habitat", "hasCoordinate", "hasFormat", "hasGeospatialIssues",
    "hasPart", "hasVersion", "higherClassification", "higherGeography", "higherGeographyID",
    "highestBiostratigraphicZone", "hostingOrganizationKey", "identificationID", "identificationQualifier",
    "identificationReferences", "identificationRemarks", "identificationVerificationStatus", "identifiedBy",
    "identifiedByID", "identifier", "individualCount", "individualID", "informationWithheld",
    "infragenericEpithet", "infraspecificEpithet", "installationKey", "institutionCode", "institutionID",
    "institutionKey", "instructionalMethod", "isFormatOf", "isInCluster", "island", "islandGroup", "isPartOf",
    "isReferencedBy", "isReplacedBy", "isRequiredBy", "isSequenced", "issue", "issued", "isVersionOf",
    "iucnRedListCategory", "kingdom", "kingdomKey", "language", "lastCrawled", "lastInterpreted", "lastParsed",
    "latestAgeOrHighestStage", "latestEonOrHighestEonothem", "latestEpochOrHighestSeries",
    "latestEraOrHighestErathem", "latestPeriodOrHighestSystem", "level0Gid", "level0Name", "level1Gid",
    "level1Name", "level2Gid", "level2Name", "level3Gid", "level3Name", "license", "lifeStage",
    "lithostratigraphicTerms", "locality", "locationAccordingTo", "locationID", "locationRemarks",
    "lowestBiostratigraphicZone", "materialSampleID", "maximumDistanceAboveSurfaceInMeters", "mediator",
    "medium", "member", "minimumDistanceAboveSurfaceInMeters", "modified", "month", "municipality",
    "nameAccordingTo", "nameAccordingToID", "namePublishedIn", "namePublishedInID", "namePublishedInYear",
    "networkKey", "nomenclaturalCode", "nomenclaturalStatus", "nonTaxonomicIssue", "occurrenceDetails",
    "occurrenceID", "occurrenceRemarks", "occurrenceStatus", "order", "orderKey", "organismID", "organismName",
    "organismQuantity", "organismQuantityType", "organismRemarks", "originalNameUsage", "originalNameUsageID",
    "otherCatalogNumbers", "ownerInstitutionCode", "parentEventID", "parentNameUsage", "parentNameUsageID",
    "pathway", "phylum", "phylumKey", "pointRadiusSpatialFit", "preparations", "previousIdentifications",
    "programmeAcronym", "projectId", "protocol", "provenance", "publishedByGbifRegion", "publisher",
    "publishingCountry", "publishingOrgKey", "recordedBy", "recordedByID", "recordNumber", "references",
    "relation", "relativeOrganismQuantity", "repatriated", "replaces", "reproductiveCondition", "requires",
    "rights", "rightsHolder", "sampleSizeUnit", "sampleSizeValue", "samplingEffort", "samplingProtocol",
    "scientificName", "scientificNameAuthorship", "scientificNameID", "sex", "source", "spatial", "species",
    "speciesKey", "specificEpithet", "startDayOfYear", "stateProvince", "subfamily", "subgenus", "subgenusKey",
    "subject", "superfamily", "tableOfContents", "taxonConceptID", "taxonID", "taxonKey", "taxonomicIssue",
    "taxonomicStatus", "taxonRank", "taxonRemarks", "temporal", "title", "tribe", "type", "typeStatus",
    "typifiedName", "verbatimCoordinateSystem", "verbatimDepth", "verbatimElevation", "verbatimEventDate",
    "verbatimIdentification", "verbatimLabel", "verbatimLocality", "verbatimScientificName",
    "verbatimScientificNameAuthorship", "verbatimSRS", "verbatimTaxonRank", "vernacularName", "vitality",
    "waterBody", "year"
})  # fmt: skip


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
# GBIF's OccurrenceSearchParameter (gbif-api), the keys a download predicate may use: another key
# is an HTTP 400. A key close to one of these is refused as a typo; one near none (GBIF adds
# parameters) is left to GBIF. CHECKLIST_KEY and VERBATIM_TAXON_ID are newer than the enum copied.
PREDICATE_KEYS = frozenset({
    "DATASET_KEY", "YEAR", "MONTH", "START_DAY_OF_YEAR", "END_DAY_OF_YEAR", "EVENT_DATE", "EVENT_DATE_GTE",
    "EVENT_DATE_LTE", "EVENT_ID", "PARENT_EVENT_ID", "SAMPLING_PROTOCOL", "PREVIOUS_IDENTIFICATIONS",
    "LAST_INTERPRETED", "MODIFIED", "DECIMAL_LATITUDE", "DECIMAL_LONGITUDE", "COORDINATE_UNCERTAINTY_IN_METERS",
    "COUNTRY", "GBIF_REGION", "CONTINENT", "PUBLISHING_COUNTRY", "PUBLISHED_BY_GBIF_REGION", "ELEVATION", "DEPTH",
    "INSTITUTION_CODE", "COLLECTION_CODE", "CATALOG_NUMBER", "RECORDED_BY", "IDENTIFIED_BY", "RECORD_NUMBER",
    "BASIS_OF_RECORD", "SEX", "IS_SEQUENCED", "TAXON_KEY", "ACCEPTED_TAXON_KEY", "KINGDOM_KEY", "PHYLUM_KEY",
    "CLASS_KEY", "ORDER_KEY", "FAMILY_KEY", "GENUS_KEY", "SUBGENUS_KEY", "SPECIES_KEY", "SCIENTIFIC_NAME",
    "VERBATIM_SCIENTIFIC_NAME", "TAXON_ID", "TAXON_CONCEPT_ID", "TAXONOMIC_STATUS", "HAS_COORDINATE", "GEOMETRY",
    "GEO_DISTANCE", "DISTANCE_FROM_CENTROID_IN_METERS", "HAS_GEOSPATIAL_ISSUE", "ISSUE", "TYPE_STATUS",
    "MEDIA_TYPE", "OCCURRENCE_ID", "ESTABLISHMENT_MEANS", "DEGREE_OF_ESTABLISHMENT", "PATHWAY", "REPATRIATED",
    "ORGANISM_ID", "STATE_PROVINCE", "WATER_BODY", "LOCALITY", "PROTOCOL", "LICENSE", "PUBLISHING_ORG",
    "NETWORK_KEY", "INSTALLATION_KEY", "HOSTING_ORGANIZATION_KEY", "CRAWL_ID", "PROJECT_ID", "PROGRAMME",
    "ORGANISM_QUANTITY", "ORGANISM_QUANTITY_TYPE", "SAMPLE_SIZE_UNIT", "SAMPLE_SIZE_VALUE",
    "RELATIVE_ORGANISM_QUANTITY", "COLLECTION_KEY", "INSTITUTION_KEY", "RECORDED_BY_ID", "IDENTIFIED_BY_ID",
    "OCCURRENCE_STATUS", "GADM_GID", "GADM_LEVEL_0_GID", "GADM_LEVEL_1_GID", "GADM_LEVEL_2_GID",
    "GADM_LEVEL_3_GID", "LIFE_STAGE", "IS_IN_CLUSTER", "DWCA_EXTENSION", "IUCN_RED_LIST_CATEGORY", "DATASET_ID",
    "DATASET_NAME", "OTHER_CATALOG_NUMBERS", "PREPARATIONS", "ISLAND", "ISLAND_GROUP", "GEOREFERENCED_BY",
    "HIGHER_GEOGRAPHY", "FIELD_NUMBER", "EARLIEST_EON_OR_LOWEST_EONOTHEM", "LATEST_EON_OR_HIGHEST_EONOTHEM",
    "EARLIEST_ERA_OR_LOWEST_ERATHEM", "LATEST_ERA_OR_HIGHEST_ERATHEM", "EARLIEST_PERIOD_OR_LOWEST_SYSTEM",
    "LATEST_PERIOD_OR_HIGHEST_SYSTEM", "EARLIEST_EPOCH_OR_LOWEST_SERIES", "LATEST_EPOCH_OR_HIGHEST_SERIES",
    "EARLIEST_AGE_OR_LOWEST_STAGE", "LATEST_AGE_OR_HIGHEST_STAGE", "LOWEST_BIOSTRATIGRAPHIC_ZONE",
    "HIGHEST_BIOSTRATIGRAPHIC_ZONE", "GROUP", "FORMATION", "MEMBER", "BED", "ASSOCIATED_SEQUENCES", "GBIF_ID",
    "CHECKLIST_KEY", "VERBATIM_TAXON_ID",
})  # fmt: skip
# GBIF's DistanceUnit names; a distance without one is in metres
DISTANCE_RE = re.compile(
    r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(in|inch|yd|yards|ft|feet|km|kilometers|NM|nmi|nauticalmiles|mm|millimeters|"
    r"cm|centimeters|mi|miles|m|meters)?\s*$"
)
WKT_RE = re.compile(r"^\s*(POLYGON|MULTIPOLYGON)\s*(\(.*\))\s*$", re.IGNORECASE | re.DOTALL)
RING_RE = re.compile(r"\(([^()]*)\)")
SKELETONS = {  # the nesting of rings ("R") each geometry type has
    "POLYGON": re.compile(r"^\(R(,R)*\)$"),
    "MULTIPOLYGON": re.compile(r"^\(\(R(,R)*\)(,\(R(,R)*\))*\)$"),
}
WKT_EXAMPLE = "POLYGON((-10 40, 5 40, 5 50, -10 50, -10 40)), longitude then latitude"
MAX_DEPTH = 100  # nesting of and/or/not: real predicates need a handful, a deeper one is a mistake


class PredicateError(ValueError):
    """A predicate GBIF would refuse; `path` is where inside it (like predicate.predicates[1].key)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def predicate_key(field: str) -> str:
    """GBIF predicate key of an occurrence field: speciesKey -> SPECIES_KEY."""
    if field in KEY_FIXES:
        return KEY_FIXES[field]
    if field in key_lkup:
        return key_lkup[field]
    return re.sub(r"(?<!^)(?=[A-Z])", "_", field).upper()


def query_to_predicate(query: dict[str, list[Any]], media_types: Sequence[str] = ("StillImage",)) -> dict[str, Any]:
    """AND across fields, IN (OR) within a field; occurrences with media of `media_types` (the
    recipe's `filters.media_types`) unless the query names mediaType itself."""
    builder = GbifDownload(creator="gbif-assets", email="unused@example.org")
    for field, values in query.items():
        key = predicate_key(field)
        strings = [str(v) for v in values]
        if len(strings) == 1:
            builder.add_predicate_dict({"type": "equals", "key": key, "value": strings[0]})
        else:
            builder.add_predicate_dict({"type": "in", "key": key, "values": strings})
    if "mediaType" not in query and len(media_types) == 1:
        builder.add_predicate_dict({"type": "equals", "key": "MEDIA_TYPE", "value": media_types[0]})
    elif "mediaType" not in query:
        builder.add_predicate_dict({"type": "in", "key": "MEDIA_TYPE", "values": list(media_types)})
    return builder.payload["predicate"]


def _names_media_type(predicate: Any) -> bool:
    if isinstance(predicate, dict):
        return predicate.get("key") == "MEDIA_TYPE" or any(_names_media_type(v) for v in predicate.values())
    return isinstance(predicate, list) and any(_names_media_type(v) for v in predicate)


def with_media_types(predicate: dict[str, Any], media_types: Sequence[str] = ("StillImage",)) -> dict[str, Any]:
    """A recipe's own predicate, asking for occurrences with media of `media_types` unless it
    names MEDIA_TYPE itself: without it, a download holds every occurrence, images or none."""
    if _names_media_type(predicate):
        return predicate
    media: dict[str, Any] = (
        {"type": "equals", "key": "MEDIA_TYPE", "value": media_types[0]}
        if len(media_types) == 1
        else {"type": "in", "key": "MEDIA_TYPE", "values": list(media_types)}
    )
    return {"type": "and", "predicates": [predicate, media]}


def query_to_search_params(
    query: dict[str, list[Any]], media_types: Sequence[str] = ("StillImage",)
) -> list[tuple[str, str]]:
    """Occurrence-search parameters: repeated parameters are OR'd by GBIF, different ones AND'd."""
    params = [(field, str(v)) for field, values in query.items() for v in values]
    if "mediaType" not in query:
        params += [("mediaType", kind) for kind in media_types]
    return params


def _number(value: Any) -> float | None:
    """A number as GBIF parses it (numbers or numeric strings), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _wkt_problem(text: str) -> str | None:
    """Why `text` is not a WKT polygon GBIF can take, or None; a syntax check, not topology."""
    match = WKT_RE.match(text)
    if not match:
        return "is not a WKT POLYGON or MULTIPOLYGON"
    body = match.group(2)
    skeleton = re.sub(r"\s+", "", RING_RE.sub("R", body))
    if not SKELETONS[match.group(1).upper()].match(skeleton):
        return f"has unbalanced or misplaced brackets for a {match.group(1).upper()}"
    for ring in RING_RE.findall(body):
        points: list[tuple[float, float]] = []
        for point in ring.split(","):
            try:
                lon, lat = (float(n) for n in point.split())
            except ValueError:
                return f"has {point.strip()!r} where a point (two numbers: longitude latitude) belongs"
            if not (math.isfinite(lon) and -90 <= lat <= 90):
                return f"has the point {point.strip()!r} outside the globe (WKT gives longitude, then latitude)"
            points.append((lon, lat))
        if len(points) < 4 or points[0] != points[-1]:
            return "has a ring that is not closed (at least 4 points, the last equal to the first)"
    return None


def _check_key(predicate: dict[str, Any], kind: str, path: str) -> None:
    """A key GBIF does not know is an HTTP 400 after the download was asked for: name the one meant."""
    name = "parameter" if kind in ("isNull", "isNotNull") and "parameter" in predicate else "key"
    key = predicate.get(name)
    if isinstance(key, str) and key in PREDICATE_KEYS:
        return
    meant = None
    if isinstance(key, str):  # "speciesKey" is the search API's name of SPECIES_KEY
        meant = predicate_key(key) if predicate_key(key) in PREDICATE_KEYS else typo_of(key, PREDICATE_KEYS)
    if meant is not None:
        raise PredicateError(f"{path}.{name}", f"{key!r} is not a GBIF search parameter; did you mean {meant!r}?")
    if isinstance(key, str) and KEY_RE.match(key):  # near no known key: a parameter newer than this list
        return
    raise PredicateError(
        f"{path}.{name}",
        f"{key!r} is not a GBIF search parameter; allowed (GBIF's OccurrenceSearchParameter): "
        + ", ".join(sorted(PREDICATE_KEYS)),
    )


def validate_predicate(predicate: Any, path: str = "predicate", depth: int = 0) -> None:
    """Reject what GBIF would answer with HTTP 400, naming where the problem is."""
    if depth > MAX_DEPTH:
        root = path.split(".", 1)[0]  # not a path of a hundred ".predicate"s
        raise PredicateError(root, f"nested more than {MAX_DEPTH} levels deep (and/or/not); flatten it")
    if not isinstance(predicate, dict):
        raise PredicateError(path, f"must be a mapping with a 'type', got {type(predicate).__name__}")
    kind = predicate.get("type")
    if kind not in TYPES:
        raise PredicateError(
            f"{path}.type", f"{kind!r} is not a GBIF predicate type; allowed: {', '.join(sorted(TYPES))}"
        )
    if kind in ("and", "or"):
        subs = predicate.get("predicates")
        if not isinstance(subs, list) or not subs:
            raise PredicateError(f"{path}.predicates", f"'{kind}' needs a non-empty list of predicates")
        for i, sub in enumerate(subs):
            validate_predicate(sub, f"{path}.predicates[{i}]", depth + 1)
        return
    if kind == "not":
        validate_predicate(predicate.get("predicate"), f"{path}.predicate", depth + 1)
        return
    if kind == "within":
        geometry = predicate.get("geometry")
        problem = _wkt_problem(geometry) if isinstance(geometry, str) else "is not a string"
        if problem is not None:
            shown = geometry if not isinstance(geometry, str) or len(geometry) <= 80 else geometry[:77] + "..."
            raise PredicateError(f"{path}.geometry", f"{shown!r} {problem}; 'within' needs one like {WKT_EXAMPLE}")
        return
    if kind == "geoDistance":
        for name, limit in (("latitude", 90), ("longitude", 180)):
            number = _number(predicate.get(name))
            if number is None or not -limit <= number <= limit:
                raise PredicateError(
                    f"{path}.{name}", f"{predicate.get(name)!r}: 'geoDistance' needs a {name} from {-limit} to {limit}"
                )
        distance = predicate.get("distance")
        match = DISTANCE_RE.match(str(distance)) if _is_scalar(distance) and not isinstance(distance, bool) else None
        if match is None or float(match.group(1)) <= 0:
            raise PredicateError(
                f"{path}.distance",
                f"{distance!r}: 'geoDistance' needs a positive distance with a unit, like 10km "
                "(units: m, km, mi, nmi, ft, yd, in, cm, mm; none means metres)",
            )
        return
    _check_key(predicate, kind, path)
    if kind == "in":
        values = predicate.get("values")
        if not isinstance(values, list) or not values:
            raise PredicateError(f"{path}.values", "'in' needs a non-empty list of values")
        for i, value in enumerate(values):
            if not _is_scalar(value):
                raise PredicateError(
                    f"{path}.values[{i}]", f"{value!r}: each value must be a string, number or boolean"
                )
    elif kind in COMPARISONS:
        if "value" not in predicate:
            raise PredicateError(f"{path}.value", f"'{kind}' needs a value")
        if not _is_scalar(predicate["value"]):
            raise PredicateError(f"{path}.value", f"{predicate['value']!r}: must be a string, number or boolean")
