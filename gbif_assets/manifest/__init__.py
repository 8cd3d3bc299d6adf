"""Licence normalization, filters, balanced sampling and splits: the `media_manifest`."""

from gbif_assets.manifest.build import (
    ManifestResult,
    build_manifest,
    check_split_leakage,
    class_distribution_plot,
    export_manifest,
    stream_targets,
)
from gbif_assets.manifest.licenses import license_url, normalize_license

__all__ = [
    "ManifestResult",
    "build_manifest",
    "check_split_leakage",
    "class_distribution_plot",
    "export_manifest",
    "license_url",
    "normalize_license",
    "stream_targets",
]
