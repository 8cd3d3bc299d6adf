"""Asset checks: the promises a training set must keep (no leakage, legal licences, files match).

Blocking checks stop downstream assets, so a leaking split never reaches the reports.
"""

import dagster as dg

from gbif_assets import steps
from gbif_assets.defs.resources import StorageResource
from gbif_assets.recipe import Recipe

_MAX_LISTED = 50


def _result(problems: list[str], **metadata: object) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={
            "problems": len(problems),
            "examples": dg.MetadataValue.json(problems[:_MAX_LISTED]),
            **metadata,
        },
    )


def build_dataset_checks(recipe: Recipe) -> list[dg.AssetChecksDefinition]:
    """The checks of one dataset, attached to its manifest and merged metadata."""
    name = recipe.name
    manifest = dg.AssetKey([name, "media_manifest"])
    metadata_key = dg.AssetKey([name, "image_metadata"])

    @dg.asset_check(asset=manifest, name="no_occurrence_in_two_splits", blocking=True)
    def no_occurrence_in_two_splits(storage: StorageResource) -> dg.AssetCheckResult:
        """An occurrence or an identical URL in two splits leaks test data into training."""
        return _result(steps.check_split_leakage(storage.dataset_home(name)))

    @dg.asset_check(asset=manifest, name="candidates_selected")
    def candidates_selected(storage: StorageResource) -> dg.AssetCheckResult:
        """A manifest that selects nothing downloads nothing: say whether the source had no media
        or the filters removed it all."""
        result = _result(steps.check_candidates_selected(storage.dataset_home(name)))
        return dg.AssetCheckResult(passed=result.passed, severity=dg.AssetCheckSeverity.WARN, metadata=result.metadata)

    @dg.asset_check(asset=metadata_key, name="files_match_metadata", blocking=True)
    def files_match_metadata(storage: StorageResource) -> dg.AssetCheckResult:
        """Every file on disk has a row in images.parquet and every row has its file."""
        return _result(steps.check_files_match(storage.dataset_home(name)))

    @dg.asset_check(asset=metadata_key, name="no_hash_in_two_splits", blocking=True)
    def no_hash_in_two_splits(storage: StorageResource) -> dg.AssetCheckResult:
        """The same image bytes in train and test would inflate every metric."""
        return _result(steps.check_hash_leakage(storage.dataset_home(name)))

    @dg.asset_check(asset=metadata_key, name="no_disallowed_license", blocking=True)
    def no_disallowed_license(storage: StorageResource) -> dg.AssetCheckResult:
        """Only licences the recipe allows may be in the training set."""
        return _result(
            steps.check_licenses(recipe, storage.dataset_home(name)),
            allowed=dg.MetadataValue.json(list(recipe.filters.licenses)),
        )

    @dg.asset_check(asset=metadata_key, name="quota_met_per_label")
    def quota_met_per_label(storage: StorageResource) -> dg.AssetCheckResult:
        """Each label reached `download.min_per_label` images despite link rot."""
        problems, rows = steps.check_quota(recipe, storage.dataset_home(name))
        result = _result(problems, min_per_label=recipe.download.min_per_label)
        return dg.AssetCheckResult(
            passed=result.passed,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={**result.metadata, "per_label": dg.MetadataValue.json(rows[:_MAX_LISTED])},
        )

    return [
        no_occurrence_in_two_splits,
        candidates_selected,
        files_match_metadata,
        no_hash_in_two_splits,
        no_disallowed_license,
        quota_met_per_label,
    ]
