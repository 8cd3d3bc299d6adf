#!/usr/bin/env bash
# The peers the benchmarks compare against, in their own virtual environment (their pinned
# dependencies must not touch the project's): gbif-dl 0.1.1, img2dataset, python-dwca-reader.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv-peers
.venv-peers/bin/pip install --quiet "gbif-dl==0.1.1" img2dataset python-dwca-reader
echo "peers installed in benchmarks/.venv-peers"
