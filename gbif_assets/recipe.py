"""Dataset recipes: one YAML file describes one training set, validated before anything runs.

A bad recipe must fail at load time with the file, the field and what is allowed, because the
alternative is a half-built dataset hours later.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
FIELD_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
HOST_RE = re.compile(r"^(\*\.)?(?=.{1,253}$)[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
DOWNLOAD_KEY_RE = re.compile(r"^\d{7}-\d{15}$")
DOI_RE = re.compile(r"^(https?://(dx\.)?doi\.org/|doi:)?(10\.\d{4,9}/\S+)$", re.IGNORECASE)

_VERSIONS = ("1.0", "2.0", "2.5", "3.0", "4.0")
_CC_KINDS = ("BY", "BY-SA", "BY-NC", "BY-NC-SA", "BY-ND", "BY-NC-ND")
LICENSE_IDS: tuple[str, ...] = (
    "CC0-1.0",
    "PDM-1.0",
    *(f"CC-{kind}-{v}" for kind in _CC_KINDS for v in _VERSIONS),
    "all-rights-reserved",
    "unknown",
)
SPLIT_NAMES = ("train", "val", "test")
MEDIA_TYPES = ("StillImage", "MovingImage", "Sound", "InteractiveResource")  # GBIF's MediaType (DCMI types)
# names servers and publishers give the formats the fetch engine keeps
FORMAT_SYNONYMS = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-png": "image/png",
    "image/tif": "image/tiff",
    "image/x-tiff": "image/tiff",
}


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names file, field and what is allowed."""


class _Model(BaseModel):
    # strict: `nb_samples: true` is not 1 and `seed: "0"` is not 0 (floats still take integers)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _listify(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _mime(text: str) -> str:
    """A format as the manifest compares it: lower case, and image/jpg or image/pjpeg as image/jpeg."""
    mime = text.strip().lower()
    return FORMAT_SYNONYMS.get(mime, mime)


def _record_field(field: str) -> None:
    """A label or stream key must be a field of GBIF occurrence records: `specieskey` or
    `fooKey` would load a column of nothing, and fail only after the occurrences are fetched."""
    from gbif_assets.gbif.predicate import RECORD_FIELDS, typo_of

    if (meant := typo_of(field, RECORD_FIELDS)) is not None:
        raise ValueError(f"{field!r} is not an occurrence field; did you mean {meant!r}?")
    if field not in RECORD_FIELDS:
        raise ValueError(
            f"{field!r} is not a field of GBIF occurrence records (such as speciesKey, genusKey, familyKey, "
            "species, genus, family, datasetKey, publishingOrgKey, countryCode, basisOfRecord, year: "
            "the names GBIF's occurrence downloads and search results use)"
        )


class Source(_Model):
    """Where occurrences come from: a new download, the search API, or an existing download."""

    mode: Literal["download", "search", "existing"]
    query: dict[str, list[str | int]] | None = None
    predicate: dict[str, Any] | None = None
    key: str | None = None

    @field_validator("query", mode="before")
    @classmethod
    def _normalise_query(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError("must be a mapping of GBIF field -> value or list of values")
        out: dict[str, list[Any]] = {}
        for field, values in value.items():
            if not isinstance(field, str) or not FIELD_RE.match(field):
                raise ValueError(f"{field!r} is not a GBIF occurrence field name")
            from gbif_assets.gbif.predicate import typo_of

            if (meant := typo_of(field)) is not None:
                raise ValueError(f"{field!r} is not a GBIF occurrence search field; did you mean {meant!r}?")
            items = _listify(values)
            if not items:
                raise ValueError(f"{field}: give at least one value")
            if field == "mediaType" and "stillimage" not in {str(v).strip().lower() for v in items}:
                raise ValueError(
                    "mediaType: must include StillImage (the fetch keeps images only); "
                    "filters.media_types is the place for the media types a set keeps"
                )
            for item in items:
                if isinstance(item, bool) or not isinstance(item, str | int):
                    raise ValueError(f"{field}: values must be strings or integers, got {item!r}")
                if isinstance(item, str) and not item.strip():
                    raise ValueError(f"{field}: an empty value matches nothing; remove it or give a value")
            out[field] = items
        return out

    @field_validator("key")
    @classmethod
    def _check_key(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if DOWNLOAD_KEY_RE.match(value):
            return value
        match = DOI_RE.match(value)
        if match:
            return match.group(3)
        raise ValueError(
            f"{value!r} is neither a GBIF download key (like 0012150-260108223611665) "
            "nor a DOI (like 10.15468/dl.vnm42s)"
        )

    @model_validator(mode="after")
    def _mode_fields(self) -> Source:
        if self.mode == "existing":
            if not self.key:
                raise ValueError("mode 'existing' needs source.key (a download key or DOI)")
            if self.query or self.predicate:
                raise ValueError("mode 'existing' takes only source.key, not query or predicate")
        elif self.key:
            raise ValueError(f"source.key is only for mode 'existing', not {self.mode!r}")
        if self.mode == "search":
            if not self.query:
                raise ValueError("mode 'search' needs source.query (search cannot take a predicate)")
            if self.predicate:
                raise ValueError("mode 'search' takes source.query, not source.predicate")
        if self.mode == "download" and bool(self.query) == bool(self.predicate):
            raise ValueError("mode 'download' needs exactly one of source.query or source.predicate")
        if self.predicate is not None:
            from gbif_assets.gbif.predicate import validate_predicate

            validate_predicate(self.predicate)  # a PredicateError: parse_recipe names the path inside it
        return self


class AllowDeny(_Model):
    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)


class PublisherFilter(AllowDeny):
    @field_validator("allow", "deny")
    @classmethod
    def _uuids(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                uuid.UUID(str(value))
            except ValueError:
                raise ValueError(f"{value!r} is not a datasetKey or publishingOrgKey (a UUID)") from None
        return [str(v).lower() for v in values]


class HostFilter(AllowDeny):
    @field_validator("allow", "deny")
    @classmethod
    def _hosts(cls, values: list[str]) -> list[str]:
        out = []
        for value in values:
            host = str(value).strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
            if not host.isascii():  # bücher.example: the name the engine connects to is its punycode
                from gbif_assets.fetch.engine import host_of

                host = host_of(f"http://{host}/") or host
            try:
                host = str(ipaddress.ip_address(host))  # an address matches only itself
            except ValueError:
                if not HOST_RE.match(host) or host.replace(".", "").isdigit():  # "0.0.2": part of an address
                    raise ValueError(
                        f"{value!r} is not a host name (like inaturalist-open-data.s3.amazonaws.com, "
                        "*.amazonaws.com for its subdomains only, or an IP address)"
                    ) from None
                if host.startswith("*.") and host[2:].replace(".", "").isdigit():
                    raise ValueError(
                        f"{value!r}: an IP address has no subdomains, so a wildcard on it matches nothing; "
                        "give the address alone (like 127.0.0.2)"
                    ) from None
            out.append(host)
        return out

    @model_validator(mode="after")
    def _not_both(self) -> HostFilter:
        both = [host for host in self.allow if host in self.deny]
        if both:
            raise ValueError(
                f"{', '.join(map(repr, both))} is in both allow and deny, so none of its images could be fetched; "
                "keep each host in one list"
            )
        return self


class Filters(_Model):
    """Which media may enter the training set."""

    licenses: list[str] = Field(default_factory=lambda: ["CC0-1.0", "CC-BY-4.0"])
    publishers: PublisherFilter = Field(default_factory=PublisherFilter)
    hosts: HostFilter = Field(default_factory=HostFilter)
    formats: list[str] = Field(default_factory=lambda: ["image/jpeg", "image/png"])
    media_types: list[str] = Field(default_factory=lambda: ["StillImage"])
    one_media_per_occurrence: bool = False
    allow_occurrence_license: bool = False

    @field_validator("licenses")
    @classmethod
    def _licenses(cls, values: list[str]) -> list[str]:
        if not values:
            raise ValueError("give at least one licence; allowed: " + ", ".join(LICENSE_IDS))
        for value in values:
            if value not in LICENSE_IDS:
                raise ValueError(f"{value!r} is not a licence id; allowed: " + ", ".join(LICENSE_IDS))
        return values

    @field_validator("formats", mode="before")
    @classmethod
    def _formats(cls, value: Any) -> list[str]:
        """A format the fetch engine cannot keep, or a typo, would silently select nothing."""
        from gbif_assets.fetch.verify import PIL_FORMATS
        from gbif_assets.gbif.predicate import typo_of

        allowed = [mime for mime, _ in PIL_FORMATS.values()]
        values = _listify(value)
        if not values:
            raise ValueError("give at least one format (like image/jpeg); an empty list would keep nothing")
        out = []
        for item in values:
            mime = _mime(item) if isinstance(item, str) else item
            if mime not in allowed:
                meant = None
                if isinstance(item, str):
                    bare = _mime(f"image/{mime}")  # "jpeg" or "png" alone
                    meant = typo_of(mime, set(allowed)) or (bare if bare in allowed else None)
                hint = f"did you mean {meant!r}? " if meant else ""
                raise ValueError(
                    f"{item!r} is not an image MIME type the fetch engine keeps; {hint}allowed: " + ", ".join(allowed)
                )
            out.append(mime)
        return list(dict.fromkeys(out))

    @field_validator("media_types", mode="before")
    @classmethod
    def _media_types(cls, value: Any) -> list[str]:
        """GBIF's media types, in GBIF's spelling: the manifest compares them, a typo keeps nothing."""
        from gbif_assets.gbif.predicate import typo_of

        values = _listify(value)
        if not values:
            raise ValueError("give at least one media type (like StillImage); an empty list would keep nothing")
        known = {kind.lower(): kind for kind in MEDIA_TYPES}
        out = []
        for item in values:
            kind = known.get(item.strip().lower()) if isinstance(item, str) else None
            if kind is None:
                meant = typo_of(item.strip(), set(MEDIA_TYPES)) if isinstance(item, str) else None
                hint = f"did you mean {meant!r}? " if meant else ""
                raise ValueError(f"{item!r} is not a GBIF media type; {hint}allowed: " + ", ".join(MEDIA_TYPES))
            out.append(kind)
        if "StillImage" not in out:
            raise ValueError(
                "must include StillImage: the fetch keeps images only, so a set of "
                + ", ".join(out)
                + " media would download nothing (other types only add media that publishers mislabel)"
            )
        return list(dict.fromkeys(out))


class Balance(_Model):
    """Class balancing with gbif-dl's semantics (seeded random instead of first-N)."""

    split_streams_by: list[str] = Field(default_factory=list)
    nb_samples: int | None = None
    nb_samples_per_stream: int | None = None
    weighted_streams: bool = False
    seed: int = 0

    @field_validator("split_streams_by", mode="before")
    @classmethod
    def _streams(cls, value: Any) -> list[str]:
        fields = _listify(value)
        for field in fields:
            if not isinstance(field, str) or not FIELD_RE.match(field):
                raise ValueError(f"{field!r} is not an occurrence field name")
            _record_field(field)
        return fields

    @field_validator("nb_samples")
    @classmethod
    def _nb_samples(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and value <= 0:
            raise ValueError(f"must be -1 (largest balanced set) or a positive integer, got {value}")
        return value

    @field_validator("nb_samples_per_stream")
    @classmethod
    def _per_stream(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(f"must be a positive integer, got {value}")
        return value

    @model_validator(mode="after")
    def _weighted(self) -> Balance:
        if self.weighted_streams and self.nb_samples is None:
            raise ValueError("weighted_streams shares nb_samples among the streams: give nb_samples too")
        return self


class Split(_Model):
    """Train/val/test fractions; assignment is grouped by occurrence and stable."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1

    @field_validator(*SPLIT_NAMES, mode="before")
    @classmethod
    def _fraction(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:  # NaN fails too
            raise ValueError(f"must be a number between 0 and 1, got {value!r}")
        return value

    @model_validator(mode="after")
    def _sums_to_one(self) -> Split:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            left_out = [name for name in SPLIT_NAMES if name not in self.model_fields_set]
            raise ValueError(f"train + val + test must sum to 1, got {total:g}" + _defaults_note(left_out))
        return self


def _defaults_note(left_out: list[str]) -> str:
    """Say which parts were left out and their defaults: `{train: 0.9}` sums to 1.1 because of them."""
    if not left_out:
        return ""
    defaults = [f"{Split.model_fields[name].default:g}" for name in left_out]
    if len(left_out) == 1:
        return f" ({left_out[0]} was left out and defaults to {defaults[0]}; give all three)"
    amounts = f"{defaults[0]} each" if len(set(defaults)) == 1 else " and ".join(defaults)
    return f" ({' and '.join(left_out)} were left out and default to {amounts}; give all three)"


class Download(_Model):
    """Fetch-engine settings; the defaults are polite to publishers."""

    min_per_label: Annotated[int, Field(ge=0)] = 50
    concurrency: Annotated[int, Field(ge=1, le=1024)] = 128
    per_host: Annotated[int, Field(ge=1, le=64)] = 8
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    max_bytes: Annotated[int, Field(ge=1024)] = 25_000_000
    max_pixels: Annotated[int, Field(ge=1024)] = 89_478_485  # Pillow's own limit: larger images are refused
    resize_max_side: Annotated[int, Field(ge=16)] | None = None
    gbif_image_cache_fallback: bool = True
    decode_check: bool = True  # every image must decode (JPEG: structure walk); off: header, pixels, end marker


_CRON_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")
_CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_CRON_NAMES = (
    None,
    None,
    None,
    "jan feb mar apr may jun jul aug sep oct nov dec",
    "sun mon tue wed thu fri sat",
)


_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _cron_values(text: str, lo: int, hi: int, names: str | None) -> set[int]:
    """The values a cron field allows; a ValueError says why the field is not valid cron."""
    lookup = {n: i + (1 if names and names.startswith("jan") else 0) for i, n in enumerate((names or "").split())}
    invalid = ValueError(f"is not valid cron (allowed {lo}-{hi}, *, ranges, steps)")
    values: set[int] = set()
    for part in text.split(","):
        base, _, step = part.partition("/")
        if step and not (step.isdigit() and int(step) > 0):
            raise invalid
        bounds = [str(lo), str(hi)] if base == "*" else base.split("-")
        if len(bounds) > 2:
            raise invalid
        numbers = [lookup.get(b.lower()) if not b.isdigit() else int(b) for b in bounds]
        if any(n is None or not lo <= n <= hi for n in numbers):
            raise invalid
        if numbers[0] > numbers[-1]:  # one rule for every field: cron ranges do not wrap around
            raise ValueError(f"has a reversed range {base!r}; write the low bound first (ranges do not wrap around)")
        first = numbers[0]
        last = numbers[-1] if len(numbers) == 2 else (hi if step else first)  # "5/10" runs to the top
        values.update(range(first, last + 1, int(step or 1)))
    return values


def validate_cron(expr: str) -> str:
    """Check a 5-field cron expression so a typo fails at load, not when the schedule ticks."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"{expr!r} must have 5 fields (minute hour day-of-month month day-of-week)")
    allowed = []
    for field, text, (lo, hi), names in zip(_CRON_FIELDS, fields, _CRON_RANGES, _CRON_NAMES, strict=True):
        try:
            allowed.append(_cron_values(text, lo, hi, names))
        except ValueError as exc:
            raise ValueError(f"{expr!r}: {field} field {text!r} {exc}") from None
    days, months = allowed[2], allowed[3]
    if not any(day <= _MONTH_DAYS[month - 1] for day in days for month in months):  # as Dagster refuses it
        raise ValueError(f"{expr!r}: no month in it has such a day, so the schedule would never run")
    return expr


class Recipe(_Model):
    """One dataset: what to fetch, how to filter, balance and split it, and how to download."""

    name: str
    label: str = "speciesKey"
    source: Source
    filters: Filters = Field(default_factory=Filters)
    balance: Balance = Field(default_factory=Balance)
    split: Split = Field(default_factory=Split)
    download: Download = Field(default_factory=Download)
    refresh_cron: str | None = None
    refresh_vanished: Literal["keep", "remove"] = "keep"
    description: str | None = None

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> str:
        if not isinstance(value, str) or not NAME_RE.match(value):
            raise ValueError(f"{value!r} must be text matching [a-z][a-z0-9_]* (lower case, digits, underscores)")
        return value

    @field_validator("label", mode="before")
    @classmethod
    def _label(cls, value: Any) -> str:
        if not isinstance(value, str) or not FIELD_RE.match(value):
            raise ValueError(f"{value!r} is not an occurrence field name (like speciesKey)")
        _record_field(value)
        return value

    @field_validator("refresh_cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return None if value is None else validate_cron(value)

    def predicate(self) -> dict[str, Any]:
        """The GBIF download predicate this recipe asks for (StillImage media only)."""
        from gbif_assets.gbif.predicate import query_to_predicate, with_media_types

        if self.source.predicate is not None:
            return with_media_types(self.source.predicate, self.filters.media_types)
        if self.source.query is None:
            raise RecipeError(f"recipe {self.name}: mode {self.source.mode!r} has no predicate")
        return query_to_predicate(self.source.query, self.filters.media_types)

    def search_params(self) -> list[tuple[str, str]]:
        """The occurrence-search parameters of the query (repeated parameters are OR'd)."""
        from gbif_assets.gbif.predicate import query_to_search_params

        return query_to_search_params(self.source.query or {}, self.filters.media_types)


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if not str(part).startswith("function-")) or "(top level)"


def parse_recipe(data: Any, origin: str) -> Recipe:
    """Validate already-parsed YAML; `origin` names the file in every error."""
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: the recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        from gbif_assets.gbif.predicate import PredicateError

        lines = []
        for err in exc.errors():
            where, msg = _format_loc(err["loc"]), err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field (check the spelling against the recipe reference in README.md)"
            elif err["type"] == "missing":
                msg = "required field is missing"
            elif isinstance(error := err.get("ctx", {}).get("error"), PredicateError):
                where, msg = f"{where}.{error.path}", error.reason  # source.predicate.predicates[1].key
            lines.append(f"  {where}: {msg}")
        raise RecipeError(f"{origin}: invalid recipe\n" + "\n".join(lines)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: the last
    one silently winning hides a recipe's real setting."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:  # "? [a, b]": YAML allows a list or mapping as a key, a Python mapping cannot hold one
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain name, not a list or mapping", key_node.start_mark
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate `datasets/<name>.yaml`; the file stem must equal the recipe name."""
    path = Path(path)
    origin = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{origin}: recipe file not found") from None
    except IsADirectoryError:
        raise RecipeError(f"{origin}: is a folder; give the recipe's .yaml file") from None
    except OSError as exc:
        raise RecipeError(f"{origin}: cannot read the recipe ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{origin}: not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{origin}: not valid YAML: {exc}") from None
    except RecursionError:
        raise RecipeError(
            f"{origin}: nested too deeply to read (a recipe needs a few levels of nesting, a predicate a handful)"
        ) from None
    recipe = parse_recipe(data, origin)
    if path.stem != recipe.name:
        raise RecipeError(
            f"{origin}: name: {recipe.name!r} must equal the file name {path.stem!r} "
            "(one file = one dataset = one asset group)"
        )
    return recipe


def load_recipes(directory: str | Path) -> list[Recipe]:
    """Every recipe in a folder, sorted by name; all errors are reported together."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RecipeError(f"{directory}: recipe folder not found (set GBIF_ASSETS_DATASETS)")
    recipes, errors = [], []
    seen: dict[str, Path] = {}
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        if path.stem in seen:
            errors.append(f"{path}: {seen[path.stem].name} already defines dataset {path.stem!r}; keep one file")
            continue
        seen[path.stem] = path
        try:
            recipes.append(load_recipe(path))
        except RecipeError as exc:
            errors.append(str(exc))
    if errors:
        raise RecipeError("\n".join(errors))
    return recipes
