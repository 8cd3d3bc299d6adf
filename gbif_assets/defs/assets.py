"""The asset graph of one recipe: request, archive, occurrences, manifest, images, reports.

Each asset is a thin wrapper: it calls one function of `gbif_assets.steps` and turns the result
into Dagster metadata. Assets hand data to each other through files in the dataset home, so a
single asset can be re-run alone (`--select`) on what its upstream left on disk.
"""

import dagster as dg

from gbif_assets import steps
from gbif_assets.defs.metadata import to_metadata
from gbif_assets.defs.resources import GbifApiResource, ProgressSink, StorageResource, settings_from
from gbif_assets.recipe import Recipe

API_POOL = "gbif_api"
IMAGES_POOL = "image_downloads"


def labels_partitions(recipe: Recipe) -> dg.DynamicPartitionsDefinition:
    """One dynamic partition per label value, fed by `media_manifest`."""
    return dg.DynamicPartitionsDefinition(name=f"{recipe.name}_labels")


def build_dataset_assets(recipe: Recipe) -> list[dg.AssetsDefinition]:
    """All assets of one dataset, keyed `<name>/<asset>` in group `<name>`."""
    name = recipe.name
    prefix = [name]
    group = name
    partitions = labels_partitions(recipe)
    mode = recipe.source.mode
    assets: list[dg.AssetsDefinition] = []

    if mode == "download":

        @dg.asset(
            name="download_request",
            key_prefix=prefix,
            group_name=group,
            kinds={"gbif", "api"},
            pool=API_POOL,
            description="A GBIF occurrence download request for the recipe's predicate.",
        )
        def download_request(
            context: dg.AssetExecutionContext, gbif: GbifApiResource, storage: StorageResource
        ) -> dg.MaterializeResult:
            settings = settings_from(gbif, storage)
            result = steps.request_download(recipe, settings, storage.dataset_home(name))
            context.log.info(f"GBIF download {result.key} requested ({result.note})")
            return dg.MaterializeResult(
                metadata={
                    "download_key": result.key,
                    "predicate": dg.MetadataValue.json(result.predicate),
                    "note": result.note,
                    "status_url": dg.MetadataValue.url(f"{settings.api_url}/occurrence/download/{result.key}"),
                }
            )

        assets.append(download_request)

    if mode in ("download", "existing"):

        @dg.asset(
            name="occurrence_archive",
            key_prefix=prefix,
            group_name=group,
            kinds={"gbif", "zip"},
            pool=API_POOL,
            deps=[dg.AssetKey([name, "download_request"])] if mode == "download" else None,
            description="The DwC-A zip on disk: streamed, resumable, verified.",
        )
        def occurrence_archive(
            context: dg.AssetExecutionContext, gbif: GbifApiResource, storage: StorageResource
        ) -> dg.MaterializeResult:
            settings = settings_from(gbif, storage)
            result = steps.fetch_archive(recipe, settings, storage.dataset_home(name))
            context.log.info(f"archive {result.path} ({result.size:,} bytes)")
            return dg.MaterializeResult(
                metadata={
                    "download_key": result.key,
                    "doi": result.doi or "",
                    "path": dg.MetadataValue.path(str(result.path)),
                    "size_bytes": result.size,
                    "total_records": result.total_records,
                    "fetched": result.fetched,
                    "citation": result.citation or "",
                }
            )

        assets.append(occurrence_archive)

    @dg.asset(
        name="occurrences",
        key_prefix=prefix,
        group_name=group,
        kinds={"duckdb"},
        pool=API_POOL if mode == "search" else None,
        deps=[dg.AssetKey([name, "occurrence_archive"])] if mode != "search" else None,
        description="DuckDB `occurrences`: one row per media item joined with its occurrence.",
    )
    def occurrences(
        context: dg.AssetExecutionContext, gbif: GbifApiResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        settings = settings_from(gbif, storage)
        result = steps.load_occurrences(recipe, settings, storage.dataset_home(name))
        for note in result.notes:
            context.log.warning(note)
        context.log.info(f"{result.rows:,} media rows in `occurrences` ({result.seconds:.1f} s)")
        return dg.MaterializeResult(metadata=to_metadata(result, storage.dataset_home(name)))

    assets.append(occurrences)

    @dg.asset(
        name="media_manifest",
        key_prefix=prefix,
        group_name=group,
        kinds={"duckdb", "parquet"},
        deps=[occurrences],
        description="Eligible candidates with stream, seeded rank, selected flag and split; "
        "registers one partition of `images` per label.",
    )
    def media_manifest(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        home = storage.dataset_home(name)
        result = steps.build_media_manifest(recipe, home)
        existing = context.instance.get_dynamic_partitions(partitions.name)
        added = sorted(set(result.labels) - set(existing), key=result.labels.index)
        vanished = sorted(set(existing) - set(result.labels))
        if added:
            context.instance.add_dynamic_partitions(partitions.name, added)
        for label in vanished:  # a backfill of every partition must not meet labels that have no candidates
            context.instance.delete_dynamic_partition(partitions.name, label)
        if vanished:
            context.log.warning(
                f"{len(vanished)} label(s) no longer in the manifest, their partitions removed (image_metadata "
                "drops their images): " + ", ".join(vanished[:20])
            )
        for note in result.notes:
            context.log.warning(note)
        context.log.info(f"manifest: {result.rows:,} candidates, {len(result.labels)} labels, {len(added)} new")
        metadata = to_metadata(result, home)
        metadata["partitions_added"] = dg.MetadataValue.json(added)
        metadata["labels_vanished"] = dg.MetadataValue.json(vanished)
        return dg.MaterializeResult(metadata=metadata)

    assets.append(media_manifest)

    @dg.asset(
        name="images",
        key_prefix=prefix,
        group_name=group,
        kinds={"aiohttp", "jpeg", "parquet"},
        pool=IMAGES_POOL,
        partitions_def=partitions,
        deps=[media_manifest],
        automation_condition=dg.AutomationCondition.eager(),
        required_resource_keys={"gbif", "storage", "progress"},
        description="The images of one label: files in the ImageFolder layout plus a Parquet log "
        "of every fetch attempt. Writes only this label's files.",
    )
    def images(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        label = context.partition_key
        gbif: GbifApiResource = context.resources.gbif
        storage: StorageResource = context.resources.storage
        progress: ProgressSink = context.resources.progress
        settings = settings_from(gbif, storage)

        def report(figures: dict) -> None:
            context.log.info(steps.progress_line(label, figures))
            progress.update(label, figures)

        result = steps.download_images(recipe, settings, storage.dataset_home(name), label, report)
        context.log.info(steps.progress_line(label, result.figures()))
        return dg.MaterializeResult(metadata=to_metadata(result, storage.dataset_home(name)))

    assets.append(images)

    @dg.asset(
        name="image_metadata",
        key_prefix=prefix,
        group_name=group,
        kinds={"parquet", "duckdb"},
        # the manifest too: a run that holds both never merges before the manifest is written
        deps=[images, media_manifest],
        automation_condition=dg.AutomationCondition.eager(),
        description="All partitions merged: one row per kept image, content-hash de-duplicated.",
    )
    def image_metadata(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        home = storage.dataset_home(name)
        result = steps.merge_metadata(recipe, home)
        context.log.info(f"{result.rows:,} images in metadata/images.parquet")
        return dg.MaterializeResult(metadata=to_metadata(result, home))

    assets.append(image_metadata)

    for report_name, func, kinds, description in (
        (
            "license_report",
            steps.license_report,
            {"csv", "markdown"},
            "Counts per licence, rights holder and publisher.",
        ),
        (
            "attribution",
            steps.attribution,
            {"csv"},
            "One attribution line per image (CC BY terms).",
        ),
        (
            "citation",
            steps.citation,
            {"cff", "bibtex"},
            "Download DOI or derived-dataset citation.",
        ),
        (
            "link_rot_report",
            steps.link_rot_report,
            {"csv", "markdown"},
            "Failures per host, publisher and error class.",
        ),
        (
            "exports",
            steps.exports,
            {"csv", "json"},
            "HF imagefolder metadata.jsonl and a Croissant description.",
        ),
    ):
        assets.append(_report_asset(recipe, report_name, func, kinds, description, image_metadata))
    return assets


def _report_asset(
    recipe: Recipe,
    report_name: str,
    func,
    kinds: set[str],
    description: str,
    upstream: dg.AssetsDefinition,
) -> dg.AssetsDefinition:
    """Reports share one shape: read the merged metadata, write files, show figures."""
    name = recipe.name

    @dg.asset(
        name=report_name,
        key_prefix=[name],
        group_name=name,
        kinds=kinds,
        deps=[upstream],
        automation_condition=dg.AutomationCondition.eager(),
        description=description,
    )
    def _report(
        context: dg.AssetExecutionContext, gbif: GbifApiResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        home = storage.dataset_home(name)
        result = func(recipe, settings_from(gbif, storage), home)
        for warning in getattr(result, "warnings", []) or []:
            context.log.warning(warning)
        return dg.MaterializeResult(metadata=to_metadata(result, home))

    return _report
