"""Recipes: the shipped examples load, and every bad input names file, field and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gbif_assets.recipe import LICENSE_IDS, RecipeError, load_recipe, load_recipes, validate_cron
from gbif_assets.settings import Settings
from gbif_assets.steps import fetch_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "datasets" / "invasive_plants.yaml"


def _write(tmp_path: Path, data: object, name: str = "demo") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def _base() -> dict:
    return yaml.safe_load(EXAMPLE.read_text()) | {"name": "demo"}


def test_shipped_recipes_load() -> None:
    recipes = {r.name: r for r in load_recipes(ROOT / "datasets")}
    assert set(recipes) >= {"invasive_plants", "invasive_plants_download"}
    search = recipes["invasive_plants"]
    assert search.source.mode == "search"
    assert search.source.query == {
        "speciesKey": [5352251, 3190653, 3189866],
        "datasetKey": [
            "7a3679ef-5582-4aaa-81f0-8c2545cafc81",
            "50c9509d-22c7-4a22-a47d-8c48425ef4a7",
        ],
    }
    assert search.balance.split_streams_by == ["datasetKey", "speciesKey"]
    assert recipes["invasive_plants_download"].source.mode == "download"


def test_scalar_query_values_become_lists(tmp_path: Path) -> None:
    data = _base()
    data["source"]["query"] = {"speciesKey": 5352251}
    assert load_recipe(_write(tmp_path, data)).source.query == {"speciesKey": [5352251]}


def test_existing_mode_accepts_doi_forms(tmp_path: Path) -> None:
    for key in (
        "10.15468/dl.vnm42s",
        "https://doi.org/10.15468/dl.vnm42s",
        "doi:10.15468/dl.vnm42s",
    ):
        data = _base()
        data["source"] = {"mode": "existing", "key": key}
        assert load_recipe(_write(tmp_path, data)).source.key == "10.15468/dl.vnm42s"
    data["source"] = {"mode": "existing", "key": "0012150-260108223611665"}
    assert load_recipe(_write(tmp_path, data)).source.key == "0012150-260108223611665"


def test_download_settings_reach_the_fetch_engine(tmp_path: Path) -> None:
    data = _base()
    data["download"] = {"max_pixels": 2_000_000, "max_bytes": 5_000_000, "decode_check": False, "per_host": 3}
    config = fetch_config(load_recipe(_write(tmp_path, data)), Settings.from_env())
    assert (config.max_pixels, config.max_bytes, config.decode_check, config.per_host) == (
        2_000_000,
        5_000_000,
        False,
        3,
    )


def _edit(path_parts: list[str], value: object):
    def apply(data: dict) -> dict:
        node = data
        for part in path_parts[:-1]:
            node = node.setdefault(part, {})
        if value is _DELETE:
            node.pop(path_parts[-1], None)
        else:
            node[path_parts[-1]] = value
        return data

    return apply


_DELETE = object()

BAD = [
    ("bad name", _edit(["name"], "Bad-Name"), "name", "[a-z][a-z0-9_]*"),
    ("unknown field", _edit(["balanse"], {}), "balanse", "unknown field"),
    (
        "unknown nested field",
        _edit(["download", "concurency"], 3),
        "download.concurency",
        "unknown field",
    ),
    (
        "bad mode",
        _edit(["source", "mode"], "scrape"),
        "source.mode",
        "'download', 'search' or 'existing'",
    ),
    ("search without query", _edit(["source", "query"], _DELETE), "source", "needs source.query"),
    (
        "search with predicate",
        _edit(["source", "predicate"], {"type": "equals"}),
        "source",
        "not source.predicate",
    ),
    ("existing without key", _edit(["source", "mode"], "existing"), "source", "needs source.key"),
    (
        "empty query values",
        _edit(["source", "query"], {"speciesKey": []}),
        "source.query",
        "at least one value",
    ),
    (
        "bad query field",
        _edit(["source", "query"], {"species key": [1]}),
        "source.query",
        "not a GBIF occurrence field",
    ),
    ("bad licence", _edit(["filters", "licenses"], ["CC-BY"]), "filters.licenses", "CC-BY-4.0"),
    (
        "empty licences",
        _edit(["filters", "licenses"], []),
        "filters.licenses",
        "at least one licence",
    ),
    (
        "bad publisher",
        _edit(["filters", "publishers"], {"allow": ["inaturalist"]}),
        "filters.publishers.allow",
        "UUID",
    ),
    (
        "bad host",
        _edit(["filters", "hosts"], {"deny": ["http://x.org/a"]}),
        "filters.hosts.deny",
        "host name",
    ),
    ("bad format", _edit(["filters", "formats"], ["jpeg"]), "filters.formats", "image MIME type"),
    ("nb_samples zero", _edit(["balance", "nb_samples"], 0), "balance.nb_samples", "-1"),
    ("nb_samples text", _edit(["balance", "nb_samples"], "all"), "balance.nb_samples", "integer"),
    (
        "per stream negative",
        _edit(["balance", "nb_samples_per_stream"], -5),
        "balance.nb_samples_per_stream",
        "positive",
    ),
    ("split sum", _edit(["split"], {"train": 0.8, "val": 0.3, "test": 0.1}), "split", "sum to 1"),
    (
        "split negative",
        _edit(["split"], {"train": 1.2, "val": -0.1, "test": -0.1}),
        "split.train",
        "must be a number between 0 and 1, got 1.2",
    ),
    (
        "per_host zero",
        _edit(["download", "per_host"], 0),
        "download.per_host",
        "greater than or equal to 1",
    ),
    (
        "concurrency huge",
        _edit(["download", "concurrency"], 100000),
        "download.concurrency",
        "less than or equal to 1024",
    ),
    (
        "max_bytes tiny",
        _edit(["download", "max_bytes"], 10),
        "download.max_bytes",
        "greater than or equal to 1024",
    ),
    (
        "max_pixels tiny",
        _edit(["download", "max_pixels"], 10),
        "download.max_pixels",
        "greater than or equal to 1024",
    ),
    ("bad cron", _edit(["refresh_cron"], "0 3 1 *"), "refresh_cron", "5 fields"),
    ("bad cron field", _edit(["refresh_cron"], "0 25 1 * *"), "refresh_cron", "allowed 0-23"),
    ("bad label", _edit(["label"], "species key"), "label", "occurrence field name"),
    (
        "query field typo",
        _edit(["source", "query"], {"speciesKeyy": [1]}),
        "source.query",
        "did you mean 'speciesKey'",
    ),
    ("empty query value", _edit(["source", "query"], {"speciesKey": [""]}), "source.query", "empty value"),
    ("label typo", _edit(["label"], "specieskey"), "label", "did you mean 'speciesKey'"),
    ("label not a GBIF field", _edit(["label"], "fooKey"), "label", "not a field of GBIF occurrence records"),
    ("label a search parameter", _edit(["label"], "geometry"), "label", "not a field of GBIF occurrence records"),
    ("label by media type", _edit(["label"], "mediaType"), "label", "not a field of GBIF occurrence records"),
    (
        "stream key not a GBIF field",
        _edit(["balance", "split_streams_by"], ["datasetKey", "photographer"]),
        "balance.split_streams_by",
        "not a field of GBIF occurrence records",
    ),
    (
        "stream field typo",
        _edit(["balance", "split_streams_by"], ["datasetkey"]),
        "balance.split_streams_by",
        "did you mean 'datasetKey'",
    ),
    (
        "bad predicate key",
        lambda d: _edit(["source"], {"mode": "download", "predicate": {"type": "equals", "key": 12, "value": "1"}})(d),
        "source.predicate.key",
        "allowed (GBIF's OccurrenceSearchParameter): ACCEPTED_TAXON_KEY",
    ),
    ("nb_samples bool", _edit(["balance", "nb_samples"], True), "balance.nb_samples", "integer"),
    ("seed bool", _edit(["balance", "seed"], False), "balance.seed", "integer"),
    ("empty formats", _edit(["filters", "formats"], []), "filters.formats", "at least one format"),
    ("empty media types", _edit(["filters", "media_types"], []), "filters.media_types", "at least one media type"),
    (
        "no image media type",
        _edit(["filters", "media_types"], ["Sound"]),
        "filters.media_types",
        "must include StillImage",
    ),
    (
        "query without images",
        _edit(["source", "query", "mediaType"], ["Sound"]),
        "source.query",
        "must include StillImage",
    ),
    (
        "weighted without nb_samples",
        lambda d: _edit(["balance", "weighted_streams"], True)(_edit(["balance", "nb_samples"], _DELETE)(d)),
        "balance",
        "give nb_samples too",
    ),
    ("cron that never runs", _edit(["refresh_cron"], "0 3 31 2 *"), "refresh_cron", "never run"),
    ("wildcard inside a host", _edit(["filters", "hosts"], {"allow": ["a.*.org"]}), "filters.hosts.allow", "host"),
    ("part of an address", _edit(["filters", "hosts"], {"deny": ["0.0.2"]}), "filters.hosts.deny", "IP address"),
    (
        "bad vanished policy",
        _edit(["refresh_vanished"], "delete"),
        "refresh_vanished",
        "'keep' or 'remove'",
    ),
    (
        "media type typo",
        _edit(["filters", "media_types"], ["StilImage"]),
        "filters.media_types",
        "did you mean 'StillImage'? allowed: StillImage, MovingImage, Sound, InteractiveResource",
    ),
    (
        "unknown media type",
        _edit(["filters", "media_types"], ["Photo"]),
        "filters.media_types",
        "'Photo' is not a GBIF media type; allowed: StillImage, MovingImage, Sound, InteractiveResource",
    ),
    (
        "format typo",
        _edit(["filters", "formats"], ["image/jpgg"]),
        "filters.formats",
        "did you mean 'image/jpeg'? allowed: image/jpeg, image/png, image/gif, image/webp, image/tiff",
    ),
    (
        "format the engine cannot keep",
        _edit(["filters", "formats"], ["image/svg+xml"]),
        "filters.formats",
        "not an image MIME type the fetch engine keeps; allowed: image/jpeg, image/png",
    ),
    (
        "host allowed and denied",
        _edit(["filters", "hosts"], {"allow": ["example.org", "a.org"], "deny": ["Example.ORG."]}),
        "filters.hosts",
        "'example.org' is in both allow and deny",
    ),
    (
        "wildcard on an address",
        _edit(["filters", "hosts"], {"allow": ["*.127.0.0.2"]}),
        "filters.hosts.allow",
        "an IP address has no subdomains",
    ),
    ("name not text", _edit(["name"], 123), "name", "must be text matching [a-z][a-z0-9_]*"),
    (
        "split NaN",
        _edit(["split"], {"train": float("nan"), "val": 0.1, "test": 0.1}),
        "split.train",
        "must be a number between 0 and 1",
    ),
    (
        "split part left out",
        _edit(["split"], {"train": 0.9}),
        "split",
        "got 1.1 (val and test were left out and default to 0.1 each",
    ),
    (
        "split one part left out",
        _edit(["split"], {"train": 0.7, "val": 0.1}),
        "split",
        "got 0.9 (test was left out and defaults to 0.1",
    ),
]


def _predicate(predicate: dict):
    return _edit(["source"], {"mode": "download", "predicate": predicate})


_MEDIA = {"type": "equals", "key": "MEDIA_TYPE", "value": "StillImage"}
BAD_PREDICATES = [
    (
        "key typo",
        {"type": "and", "predicates": [_MEDIA, {"type": "equals", "key": "SPECIES_KY", "value": 1}]},
        "source.predicate.predicates[1].key",
        "'SPECIES_KY' is not a GBIF search parameter; did you mean 'SPECIES_KEY'?",
    ),
    (
        "search API name",
        {"type": "not", "predicate": {"type": "equals", "key": "speciesKey", "value": 1}},
        "source.predicate.predicate.key",
        "did you mean 'SPECIES_KEY'?",
    ),
    ("not a key", {"type": "equals", "key": "foo bar", "value": 1}, "source.predicate.key", "TAXON_KEY"),
    (
        "isNull parameter",
        {"type": "isNull", "parameter": "RECORDED_BYY"},
        "source.predicate.parameter",
        "did you mean 'RECORDED_BY'?",
    ),
    (
        "latitude not a number",
        {"type": "geoDistance", "latitude": "abc", "longitude": 999, "distance": -5},
        "source.predicate.latitude",
        "needs a latitude from -90 to 90",
    ),
    (
        "longitude out of range",
        {"type": "geoDistance", "latitude": 10, "longitude": 999, "distance": "10km"},
        "source.predicate.longitude",
        "needs a longitude from -180 to 180",
    ),
    (
        "negative distance",
        {"type": "geoDistance", "latitude": 10, "longitude": 20, "distance": -5},
        "source.predicate.distance",
        "needs a positive distance with a unit, like 10km",
    ),
    (
        "unknown distance unit",
        {"type": "geoDistance", "latitude": 10, "longitude": 20, "distance": "10 leagues"},
        "source.predicate.distance",
        "units: m, km, mi",
    ),
    (
        "geometry not WKT",
        {"type": "within", "geometry": "not wkt"},
        "source.predicate.geometry",
        "'not wkt' is not a WKT POLYGON or MULTIPOLYGON",
    ),
    (
        "geometry with a word for a number",
        {"type": "within", "geometry": "POLYGON((0 0, 1 zero, 1 1, 0 0))"},
        "source.predicate.geometry",
        "'1 zero' where a point (two numbers: longitude latitude) belongs",
    ),
    (
        "geometry ring not closed",
        {"type": "within", "geometry": "POLYGON((0 0, 1 0, 1 1, 0 1))"},
        "source.predicate.geometry",
        "not closed",
    ),
    (
        "geometry brackets",
        {"type": "within", "geometry": "MULTIPOLYGON((0 0, 1 0, 1 1, 0 0))"},
        "source.predicate.geometry",
        "brackets",
    ),
    (
        "geometry latitude",
        {"type": "within", "geometry": "POLYGON((0 0, 1 0, 1 95, 0 0))"},
        "source.predicate.geometry",
        "outside the globe",
    ),
    (
        "in with a mapping",
        {"type": "in", "key": "SPECIES_KEY", "values": [1, {"a": 1}]},
        "source.predicate.values[1]",
        "each value must be a string, number or boolean",
    ),
    (
        "equals with a list",
        {"type": "equals", "key": "SPECIES_KEY", "value": [1]},
        "source.predicate.value",
        "must be a string, number or boolean",
    ),
]


@pytest.mark.parametrize(("case", "predicate", "field", "allowed"), BAD_PREDICATES, ids=[b[0] for b in BAD_PREDICATES])
def test_predicate_gbif_would_refuse_names_its_path(
    tmp_path: Path, case: str, predicate: dict, field: str, allowed: str
) -> None:
    path = _write(tmp_path, _predicate(predicate)(_base()))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert str(path) in message, message
    assert f"  {field}: " in message, message
    assert allowed in message, message


@pytest.mark.parametrize(
    "predicate",
    [
        {"type": "geoDistance", "latitude": "52.5", "longitude": -13, "distance": "10km"},
        {"type": "geoDistance", "latitude": -90, "longitude": 180, "distance": 500},
        {"type": "geoDistance", "latitude": 0, "longitude": 0, "distance": "2.5 mi"},
        {"type": "within", "geometry": "POLYGON((-10 40, 5 40, 5 50, -10 50, -10 40))"},
        {"type": "within", "geometry": "multipolygon(((0 0,9 0,9 9,0 0),(5 1,6 1,6 2,5 1)),((20 9,21 9,21 8,20 9)))"},
        {"type": "and", "predicates": [_MEDIA, {"type": "in", "key": "SPECIES_KEY", "values": [1, "2"]}]},
        {"type": "isNotNull", "parameter": "RECORDED_BY"},
        {"type": "greaterThanOrEquals", "key": "YEAR", "value": 2000},
        {"type": "equals", "key": "SOME_PARAMETER_GBIF_ADDS_LATER", "value": "x"},  # near no known key: GBIF decides
    ],
)  # fmt: skip
def test_predicates_gbif_takes_pass(tmp_path: Path, predicate: dict) -> None:
    """Sent as written, with the recipe's media types added when the predicate names none (a
    download of every occurrence, images or none, is not what an image set asks for)."""
    sent = load_recipe(_write(tmp_path, _predicate(predicate)(_base()))).predicate()
    expected = (
        predicate if _MEDIA in predicate.get("predicates", []) else {"type": "and", "predicates": [predicate, _MEDIA]}
    )
    assert sent == expected


def test_predicate_nesting_is_limited() -> None:
    """A predicate nested 1200 levels deep is refused by name, not with a RecursionError."""
    from gbif_assets.recipe import parse_recipe

    predicate = {"type": "equals", "key": "SPECIES_KEY", "value": 1}
    for _ in range(1200):
        predicate = {"type": "not", "predicate": predicate}
    data = _predicate(predicate)(_base())
    with pytest.raises(RecipeError, match=r"\n  source\.predicate: nested more than 100 levels deep"):
        parse_recipe(data, "x.yaml")


@pytest.mark.parametrize(("case", "edit", "field", "allowed"), BAD, ids=[b[0] for b in BAD])
def test_bad_recipe_names_file_field_and_allowed(tmp_path: Path, case: str, edit, field: str, allowed: str) -> None:
    path = _write(tmp_path, edit(_base()))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert str(path) in message, message
    assert f"  {field}:" in message, message
    assert allowed in message, message


def test_download_mode_needs_exactly_one_of_query_or_predicate(tmp_path: Path) -> None:
    data = _base()
    data["source"] = {"mode": "download"}
    with pytest.raises(RecipeError, match=r"exactly one of source\.query or source\.predicate"):
        load_recipe(_write(tmp_path, data))


def test_bad_key_in_existing_mode(tmp_path: Path) -> None:
    data = _base()
    data["source"] = {"mode": "existing", "key": "not-a-key"}
    with pytest.raises(RecipeError, match=r"source.key: 'not-a-key' is neither a GBIF download key"):
        load_recipe(_write(tmp_path, data))


def test_name_must_match_file(tmp_path: Path) -> None:
    path = _write(tmp_path, _base(), name="other")
    with pytest.raises(RecipeError, match=r"must equal the file name 'other'"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: [unclosed", "not valid YAML"),
        ("- a\n- b\n", "must be a YAML mapping"),
        ("", "must be a YAML mapping"),
        ("name: demo\n? [a, b]\n: 1\n", "a key must be a plain name, not a list or mapping"),
        ("name: " + "[" * 5000, "nested too deeply"),
        ("name: demo\nsource: {mode: download, predicate: " + "{type: not, predicate: " * 1200, "nested too deeply"),
    ],
)
def test_not_a_recipe(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(RecipeError, match=expected):
        load_recipe(_write(tmp_path, text))


@pytest.mark.parametrize(
    "text",
    [
        "name: demo\n? [a, b]\n: 1\n",
        "name: " + "[" * 5000,
        "name: demo\nsource: {predicate: " + "{type: not, predicate: " * 1200,
    ],
    ids=["complex key", "5000 brackets", "1200 nots"],
)
def test_cli_exits_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    from gbif_assets.cli import main

    path = _write(tmp_path, text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and "Traceback" not in err, err


def test_formats_and_media_types_are_normalised(tmp_path: Path) -> None:
    """Synonyms, case and spaces are what a publisher or a hurried user writes: normalised, not refused."""
    data = _base()
    data["filters"] = {
        "formats": [" Image/JPG", "image/pjpeg", "image/png", "IMAGE/TIF"],
        "media_types": ["stillimage ", "StillImage"],
    }
    filters = load_recipe(_write(tmp_path, data)).filters
    assert filters.formats == ["image/jpeg", "image/png", "image/tiff"]
    assert filters.media_types == ["StillImage"]


def test_media_types_reach_the_gbif_query(tmp_path: Path) -> None:
    """Occurrences whose only media a publisher typed InteractiveResource are asked for too."""
    data = _edit(["filters", "media_types"], ["StillImage", "interactiveresource"])(_base())
    recipe = load_recipe(_write(tmp_path, data))
    assert [v for k, v in recipe.search_params() if k == "mediaType"] == ["StillImage", "InteractiveResource"]
    media = [p for p in recipe.predicate()["predicates"] if p["key"] == "MEDIA_TYPE"]
    assert media == [{"type": "in", "key": "MEDIA_TYPE", "values": ["StillImage", "InteractiveResource"]}]
    default = load_recipe(_write(tmp_path, _base()))
    assert [v for k, v in default.search_params() if k == "mediaType"] == ["StillImage"]


@pytest.mark.parametrize("field", ["iucnRedListCategory", "stateProvince", "level1Name", "order", "recordedByID"])
def test_any_gbif_occurrence_field_may_label_or_balance(tmp_path: Path, field: str) -> None:
    """Rarer fields of GBIF's records (IUCN category, GADM level, order...) stay valid labels."""
    data = _edit(["balance", "split_streams_by"], [field])(_edit(["label"], field)(_base()))
    recipe = load_recipe(_write(tmp_path, data))
    assert recipe.label == field and recipe.balance.split_streams_by == [field]


@pytest.mark.parametrize(
    ("expr", "field"),
    [
        ("5-1 3 1 * *", "minute"),
        ("0 22-2 * * *", "hour"),
        ("0 3 10-5 * *", "day-of-month"),
        ("0 3 1 dec-jan *", "month"),
        ("0 3 * * fri-mon", "day-of-week"),
        ("0 3 1,20-10/2 * *", "day-of-month"),
    ],
)
def test_reversed_cron_range_is_refused_in_every_field(expr: str, field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} field '[^']*' has a reversed range"):
        validate_cron(expr)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="recipe folder not found"):
        load_recipes(tmp_path / "nope")


def test_load_recipes_reports_every_bad_file(tmp_path: Path) -> None:
    _write(tmp_path, _edit(["split"], {"train": 1, "val": 1, "test": 0})(_base()), name="demo")
    other = _edit(["name"], "other")(_base())
    other["download"] = {"retries": 99}
    _write(tmp_path, other, name="other")
    with pytest.raises(RecipeError) as info:
        load_recipes(tmp_path)
    assert "demo.yaml" in str(info.value) and "other.yaml" in str(info.value)


def test_licence_ids_cover_the_families() -> None:
    for lic in ("CC0-1.0", "CC-BY-4.0", "CC-BY-NC-SA-3.0", "CC-BY-NC-ND-4.0", "PDM-1.0", "unknown"):
        assert lic in LICENSE_IDS


@pytest.mark.parametrize("expr", ["0 3 1 * *", "*/15 * * * mon-fri", "0 0 1 jan,jul *", "5 4 * * 7"])
def test_valid_cron(expr: str) -> None:
    assert validate_cron(expr) == expr


def test_a_folder_or_a_duplicate_key_is_named(tmp_path: Path) -> None:
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(RecipeError, match=r"dir\.yaml: is a folder"):
        load_recipe(tmp_path / "dir.yaml")
    text = EXAMPLE.read_text().replace("name: invasive_plants\n", "name: demo\n") + "label: datasetKey\n"
    with pytest.raises(RecipeError, match="duplicate key 'label'"):
        load_recipe(_write(tmp_path, text))


def test_anchors_and_merge_keys_still_work(tmp_path: Path) -> None:
    text = (
        "name: demo\nlabel: speciesKey\nsource: {mode: search, query: {speciesKey: [1]}}\n"
        "common: &d {concurrency: 8, per_host: 2}\n"
    )
    with pytest.raises(RecipeError, match="common: unknown field"):  # the anchor's holder is still checked
        load_recipe(_write(tmp_path, text))
    text = (
        "name: demo\nsource: {mode: search, query: {speciesKey: [1]}}\n"
        "download: &d {concurrency: 8, per_host: 2}\n"
        "balance: {split_streams_by: [datasetKey]}\n"
    )
    assert load_recipe(_write(tmp_path, text)).download.per_host == 2


def test_same_name_as_yaml_and_yml(tmp_path: Path) -> None:
    _write(tmp_path, _base())
    (tmp_path / "demo.yml").write_text((tmp_path / "demo.yaml").read_text())
    with pytest.raises(RecipeError, match=r"demo\.yml: demo\.yaml already defines dataset 'demo'"):
        load_recipes(tmp_path)


def test_host_entries() -> None:
    """An address matches only itself; "*.name" is allowed at the front only."""
    data = _base()
    data["filters"]["hosts"] = {"allow": ["*.amazonaws.com", "127.0.0.2", "[::1]", "Example.ORG.", "bücher.example"]}
    from gbif_assets.recipe import parse_recipe

    assert parse_recipe(data, "x").filters.hosts.allow == [
        "*.amazonaws.com", "127.0.0.2", "::1", "example.org", "xn--bcher-kva.example"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "expr",
    ["0 3 1 * *", "0 3 29 2 *", "0 3 30 2 *", "0 3 31 2 1", "0 3 31 4,6 *", "0 3 31 4,7 *", "5/10 * * * *",
     "0 0 1-7 jan-mar mon", "0 3 31 */2 *", "0 3 30-31 2 *", "0 3 31 feb,apr,jun *"],
)  # fmt: skip
def test_cron_agrees_with_dagster(expr: str) -> None:
    """What Dagster's schedule refuses, the recipe refuses, so a recipe never breaks `dagster dev`
    (the recipe also refuses schedules Dagster takes that can never run, like the 31st of April)."""
    import dagster as dg

    try:
        dg.ScheduleDefinition(name="x", cron_schedule=expr, target=dg.AssetSelection.all())
        dagster_ok = True
    except dg.DagsterInvalidDefinitionError:
        dagster_ok = False
    try:
        validate_cron(expr)
        ours_ok = True
    except ValueError:
        ours_ok = False
    assert dagster_ok or not ours_ok
    assert ours_ok == (
        expr not in ("0 3 30 2 *", "0 3 31 2 1", "0 3 31 4,6 *", "0 3 30-31 2 *", "0 3 31 feb,apr,jun *")
    )
