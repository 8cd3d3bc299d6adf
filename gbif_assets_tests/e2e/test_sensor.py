"""The `gbif_download_status` sensor against the emulator, through every state GBIF reports."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from gbif_assets.defs.definitions import build_definitions
from gbif_assets.defs.resources import default_resources
from gbif_assets.gbif import DownloadGone
from gbif_assets.recipe import load_recipe
from gbif_assets_tests.conftest import copy_recipe


def _setup(gbif_env: Path, name: str):
    recipe = load_recipe(copy_recipe("invasive_plants_download", gbif_env / "datasets", name=name))
    defs = build_definitions([recipe])
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        list(defs.assets),
        selection=dg.AssetSelection.assets(dg.AssetKey([name, "download_request"])),
        instance=instance,
        resources=default_resources(),
    )
    assert result.success
    mat = result.get_asset_materialization_events()[0].materialization
    key = str(mat.metadata["download_key"].value)
    return defs, instance, key


def _tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
    sensor = defs.resolve_sensor_def("gbif_download_status")
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=default_resources()) as ctx:
        result = sensor(ctx)
    assert isinstance(result, dg.SensorResult)
    return result


def test_sensor_waits_then_starts_archive_run(gbif_env: Path, emulator) -> None:
    defs, instance, key = _setup(gbif_env, "sensor_ok")
    emulator.set_status(key, "PREPARING")
    first = _tick(defs, instance, None)
    assert not first.run_requests
    assert json.loads(first.cursor)["sensor_ok"] == {
        "key": key,
        "status": "PREPARING",
        "settled": False,
    }
    emulator.set_status(key, "RUNNING")
    second = _tick(defs, instance, first.cursor)
    assert not second.run_requests
    assert json.loads(second.cursor)["sensor_ok"]["status"] == "RUNNING"
    emulator.set_status(key, "SUCCEEDED")
    third = _tick(defs, instance, second.cursor)
    assert len(third.run_requests) == 1
    request = third.run_requests[0]
    assert request.run_key == f"sensor_ok:{key}"
    assert {k.path[-1] for k in request.asset_selection} == {
        "occurrence_archive",
        "occurrences",
        "media_manifest",
    }
    # settled: the next tick neither polls again nor requests twice
    fourth = _tick(defs, instance, third.cursor)
    assert not fourth.run_requests


@pytest.mark.parametrize("state", ["FAILED", "KILLED", "CANCELLED"])
def test_sensor_reports_terminal_failures_once(gbif_env: Path, emulator, state: str) -> None:
    defs, instance, key = _setup(gbif_env, f"sensor_{state.lower()}")
    emulator.set_status(key, state)
    result = _tick(defs, instance, None)
    assert not result.run_requests
    entry = json.loads(result.cursor)[f"sensor_{state.lower()}"]
    assert entry == {"key": key, "status": state, "settled": True}
    assert any(obs.metadata["status"].value == state for obs in result.asset_events)
    again = _tick(defs, instance, result.cursor)
    assert not again.run_requests and not again.asset_events


def test_sensor_asks_again_after_file_erased(gbif_env: Path, emulator) -> None:
    defs, instance, key = _setup(gbif_env, "sensor_erased")
    emulator.set_status(key, "FILE_ERASED")
    result = _tick(defs, instance, None)
    assert len(result.run_requests) == 1
    assert [k.path[-1] for k in result.run_requests[0].asset_selection] == ["download_request"]


def test_an_erased_download_with_a_whole_archive_on_disk_is_reused(gbif_env: Path, emulator) -> None:
    """GBIF erases a download's file after a while; the archive we already hold (same key, same
    size) still builds and keeps its DOI, in existing mode and in download mode alike."""
    from gbif_assets import steps
    from gbif_assets.settings import Settings

    _, _, key = _setup(gbif_env, "erased_reuse")
    emulator.set_status(key, "SUCCEEDED")
    path = gbif_env / "datasets" / "erased_existing.yaml"
    path.write_text(f"name: erased_existing\nsource: {{mode: existing, key: '{key}'}}\n")
    recipe, settings = load_recipe(path), Settings.from_env()
    home = settings.dataset_home(recipe.name)
    first = steps.fetch_archive(recipe, settings, home)
    assert first.fetched and first.doi
    emulator.set_status(key, "FILE_ERASED")
    again = steps.fetch_archive(recipe, settings, home)
    assert (again.fetched, again.path, again.doi, again.size) == (False, first.path, first.doi, first.size)
    first.path.write_bytes(first.path.read_bytes()[:100])  # not whole any more: a new download is needed
    with pytest.raises(DownloadGone, match="erased by GBIF"):
        steps.fetch_archive(recipe, settings, home)
