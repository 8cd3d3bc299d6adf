"""Several datasets in one instance: separate groups, partitions, schedules and sensor-cursor
entries, and one failing dataset does not block another."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from gbif_assets.defs.definitions import build_definitions
from gbif_assets.defs.resources import default_resources
from gbif_assets.recipe import load_recipe
from gbif_assets_tests.conftest import copy_recipe


def test_each_recipe_is_its_own_group(gbif_env: Path) -> None:
    names = ["plants_a", "plants_b"]
    recipes = [load_recipe(copy_recipe("invasive_plants", gbif_env / "datasets", name=n)) for n in names]
    recipes.append(load_recipe(copy_recipe("invasive_plants_download", gbif_env / "datasets", name="plants_dl")))
    defs = build_definitions(recipes)
    graph = defs.resolve_asset_graph()
    groups = {key.path[0]: graph.get(key).group_name for key in graph.get_all_asset_keys()}
    assert all(group == prefix for prefix, group in groups.items())
    partitions = {graph.get(dg.AssetKey([n, "images"])).partitions_def.name for n in [*names, "plants_dl"]}
    assert partitions == {"plants_a_labels", "plants_b_labels", "plants_dl_labels"}
    schedules = {s.name for s in defs.schedules}
    assert schedules == {"plants_a_refresh", "plants_b_refresh", "plants_dl_refresh"}
    assert dg.AssetKey(["plants_a", "download_request"]) not in graph.get_all_asset_keys()  # search mode


def test_a_failing_dataset_does_not_block_another(gbif_env: Path, emulator) -> None:
    good = load_recipe(copy_recipe("invasive_plants_download", gbif_env / "datasets", name="dl_good"))
    bad = load_recipe(copy_recipe("invasive_plants_download", gbif_env / "datasets", name="dl_bad"))
    defs = build_definitions([good, bad])
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        list(defs.assets),
        selection=dg.AssetSelection.assets(dg.AssetKey(["dl_good", "download_request"])),
        instance=instance,
        resources=default_resources(),
    )
    key = result.get_asset_materialization_events()[0].materialization.metadata["download_key"].value
    emulator.set_status(key, "SUCCEEDED")
    # the other dataset points at a download GBIF does not know (an erased account, a typo)
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=["dl_bad", "download_request"], metadata={"download_key": "0000000-000000000000404"}
        )
    )
    sensor = defs.resolve_sensor_def("gbif_download_status")
    with dg.build_sensor_context(instance=instance, resources=default_resources()) as context:
        answer = sensor(context)
    assert [r.run_key for r in answer.run_requests] == [f"dl_good:{key}"]
    cursor = json.loads(answer.cursor)
    assert cursor["dl_good"]["status"] == "SUCCEEDED" and "dl_bad" not in cursor  # retried next tick
