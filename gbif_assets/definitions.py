"""Entry point for `dagster dev` (workspace.yaml): every recipe in $GBIF_ASSETS_DATASETS."""

from gbif_assets.defs.definitions import load_definitions

defs = load_definitions()
