"""The one `Definitions` object: every recipe in `$GBIF_ASSETS_DATASETS` becomes an asset group."""

import os
from pathlib import Path

import dagster as dg

from gbif_assets.defs.assets import build_dataset_assets
from gbif_assets.defs.checks import build_dataset_checks
from gbif_assets.defs.resources import ProgressSink, default_resources
from gbif_assets.defs.schedules import build_refresh_schedule
from gbif_assets.defs.sensors import build_download_sensor
from gbif_assets.recipe import Recipe, load_recipes


def images_job_name(recipe: Recipe) -> str:
    """Partitioned job of one dataset's images (backfills and GraphQL launches use it)."""
    return f"{recipe.name}_images_job"


def build_definitions(recipes: list[Recipe], progress: ProgressSink | None = None) -> dg.Definitions:
    """Assets, checks, jobs, schedules and the status sensor for the given recipes."""
    assets, checks, jobs, schedules = [], [], [], []
    for recipe in recipes:
        assets += build_dataset_assets(recipe)
        checks += build_dataset_checks(recipe)
        jobs.append(
            dg.define_asset_job(
                images_job_name(recipe),
                selection=dg.AssetSelection.assets(dg.AssetKey([recipe.name, "images"])),
            )
        )
        schedule = build_refresh_schedule(recipe)
        if schedule is not None:
            schedules.append(schedule)
    sensor = build_download_sensor(recipes)
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        schedules=schedules,
        sensors=[sensor] if sensor else [],
        resources=default_resources(progress),
    )


def load_definitions() -> dg.Definitions:
    """Definitions for the recipes folder named by the environment (default ./datasets)."""
    folder = Path(os.environ.get("GBIF_ASSETS_DATASETS", "datasets"))
    return build_definitions(load_recipes(folder))
