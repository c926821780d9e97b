#!/usr/bin/env bash
# Set up, then run the seed walkthrough demo on sparse files. Arguments go to `devmapper demo`.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

bash scripts/setup.sh
exec .venv/bin/devmapper demo "$@"
