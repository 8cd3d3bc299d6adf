"""`gbif_download_status`: polls pending GBIF downloads of every download-mode recipe.

One sensor serves all datasets; its JSON cursor keeps one entry per dataset (key, last status,
whether it is settled), so datasets never block each other and a restart resumes exactly.
"""

import json

import dagster as dg

from gbif_assets import steps
from gbif_assets.defs.resources import GbifApiResource, StorageResource, settings_from
from gbif_assets.gbif import GbifError
from gbif_assets.recipe import Recipe

PENDING = {"PREPARING", "RUNNING", "SUSPENDED"}
FAILED = {"FAILED", "KILLED", "CANCELLED"}


def _latest_key(instance: dg.DagsterInstance, name: str) -> str | None:
    event = instance.get_latest_materialization_event(dg.AssetKey([name, "download_request"]))
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("download_key")
    return None if value is None else str(value.value)


def build_download_sensor(recipes: list[Recipe]) -> dg.SensorDefinition | None:
    """The status sensor, or None when no recipe uses download mode."""
    watched = [r for r in recipes if r.source.mode == "download"]
    if not watched:
        return None
    targets = [
        dg.AssetKey([r.name, a])
        for r in watched
        for a in ("download_request", "occurrence_archive", "occurrences", "media_manifest")
    ]

    @dg.sensor(
        name="gbif_download_status",
        minimum_interval_seconds=60,
        target=targets,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Polls GBIF download requests; SUCCEEDED starts the archive run, FILE_ERASED "
        "asks again, FAILED/KILLED/CANCELLED are reported once.",
    )
    def gbif_download_status(
        context: dg.SensorEvaluationContext, gbif: GbifApiResource, storage: StorageResource
    ) -> dg.SensorResult:
        cursor: dict[str, dict] = json.loads(context.cursor) if context.cursor else {}
        settings = settings_from(gbif, storage)
        run_requests: list[dg.RunRequest] = []
        observations: list[dg.AssetObservation] = []
        for recipe in watched:
            name = recipe.name
            key = _latest_key(context.instance, name)
            if key is None:
                continue
            entry = cursor.get(name, {})
            if entry.get("key") == key and entry.get("settled"):
                continue
            try:
                status = steps.download_status(settings, key)
            except GbifError as exc:  # one dataset's trouble must not stop the others
                context.log.warning(f"{name}: status of {key} unavailable: {exc}")
                continue
            state = str(status.get("status", "UNKNOWN"))
            entry = {"key": key, "status": state, "settled": state not in PENDING}
            if entry != cursor.get(name):
                observations.append(
                    dg.AssetObservation(
                        asset_key=dg.AssetKey([name, "download_request"]),
                        metadata={
                            "download_key": key,
                            "status": state,
                            "doi": status.get("doi") or "",
                        },
                    )
                )
            if state == "SUCCEEDED":
                run_requests.append(
                    dg.RunRequest(
                        run_key=f"{name}:{key}",
                        asset_selection=[
                            dg.AssetKey([name, a]) for a in ("occurrence_archive", "occurrences", "media_manifest")
                        ],
                        tags={"gbif/download_key": key},
                    )
                )
            elif state == "FILE_ERASED":
                context.log.warning(f"{name}: download {key} was erased by GBIF; requesting a new one")
                run_requests.append(
                    dg.RunRequest(
                        run_key=f"{name}:{key}:rerequest",
                        asset_selection=[dg.AssetKey([name, "download_request"])],
                    )
                )
            elif state in FAILED:
                context.log.error(f"{name}: GBIF download {key} ended {state}; not retried")
            cursor[name] = entry
        return dg.SensorResult(
            run_requests=run_requests,
            asset_events=observations,
            cursor=json.dumps(cursor, sort_keys=True),
        )

    return gbif_download_status
