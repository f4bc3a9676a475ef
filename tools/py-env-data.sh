#!/usr/bin/env bash
# Create (once) the venv for the data-stage Python tools and print its python.
# The venv lives in $MEDREASON_CACHE (default ~/.cache/medreason-pipeline),
# keyed by the hash of tools/requirements-data.txt, never inside the repo.
# Usage: py=$(bash tools/py-env-data.sh) && "$py" tools/load_parquet.py DIR
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
venv_for tools/requirements-data.txt
