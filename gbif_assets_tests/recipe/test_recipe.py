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
        "less than or equal to 1",
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
    (
        "stream field typo",
        _edit(["balance", "split_streams_by"], ["datasetkey"]),
        "balance.split_streams_by",
        "did you mean 'datasetKey'",
    ),
    (
        "bad predicate key",
        lambda d: _edit(["source"], {"mode": "download", "predicate": {"type": "equals", "key": 12, "value": "1"}})(d),
        "source",
        "predicate.key",
    ),
    ("nb_samples bool", _edit(["balance", "nb_samples"], True), "balance.nb_samples", "integer"),
    ("seed bool", _edit(["balance", "seed"], False), "balance.seed", "integer"),
    ("empty formats", _edit(["filters", "formats"], []), "filters.formats", "at least one format"),
    ("empty media types", _edit(["filters", "media_types"], []), "filters.media_types", "at least one media type"),
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
]


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
    ],
)
def test_not_a_recipe(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(RecipeError, match=expected):
        load_recipe(_write(tmp_path, text))


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
