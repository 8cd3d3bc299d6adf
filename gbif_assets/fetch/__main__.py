"""`python -m gbif_assets.fetch MANIFEST LABEL HOME`: one partition outside Dagster (crash tests, debugging)."""

import sys
from pathlib import Path

from gbif_assets.fetch import FetchConfig, download_label
from gbif_assets.settings import env_flag

if __name__ == "__main__":
    manifest, label, home = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    config = FetchConfig(allow_private_hosts=env_flag("GBIF_ASSETS_ALLOW_PRIVATE_HOSTS"), concurrency=4, per_host=2)
    result = download_label(Path(manifest), label, home, config)
    print(f"{result.kept}/{result.target} kept, {result.fetched} fetched")
