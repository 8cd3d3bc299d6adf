"""Licence normalization, filters, balanced sampling and splits: the `media_manifest`."""

from gbif_assets.manifest.build import (
    ManifestResult,
    build_manifest,
    check_split_leakage,
    class_distribution_plot,
    point_manifest_view,
    stream_targets,
    write_excluded,
)
from gbif_assets.manifest.licenses import license_url, normalize_license

__all__ = [
    "ManifestResult",
    "build_manifest",
    "check_split_leakage",
    "class_distribution_plot",
    "license_url",
    "normalize_license",
    "point_manifest_view",
    "stream_targets",
    "write_excluded",
]
