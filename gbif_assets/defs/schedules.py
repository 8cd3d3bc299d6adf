"""Monthly (or any `refresh_cron`) refresh of each dataset."""

import dagster as dg

from gbif_assets.recipe import Recipe


def build_refresh_schedule(recipe: Recipe) -> dg.ScheduleDefinition | None:
    """Download mode asks GBIF for a new download (the sensor takes over); search mode re-harvests.

    Images and reports follow through their automation conditions, so the refresh only fetches
    what is new. An `existing` download never changes, so it gets no schedule.
    """
    if recipe.refresh_cron is None or recipe.source.mode == "existing":
        return None
    first = "download_request" if recipe.source.mode == "download" else "occurrences"
    selection = dg.AssetSelection.assets(dg.AssetKey([recipe.name, first]))
    if recipe.source.mode == "search":
        selection = selection | dg.AssetSelection.assets(dg.AssetKey([recipe.name, "media_manifest"]))
    return dg.ScheduleDefinition(
        name=f"{recipe.name}_refresh",
        cron_schedule=recipe.refresh_cron,
        target=selection,
        execution_timezone="UTC",
        description=f"Refresh {recipe.name} from GBIF on '{recipe.refresh_cron}' (UTC).",
    )
