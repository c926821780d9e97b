#!/usr/bin/env bash
# Set up, then lint (ruff), type-check (mypy --strict via pyproject) and run the tests.
#
# Every step runs even if an earlier one fails, so one run reports everything;
# the exit status is non-zero if any step failed. Extra arguments go to pytest.
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

bash scripts/setup.sh || { echo "test.sh: setup failed" >&2; exit 1; }

failed=()

# Lint only the trees that exist (git does not keep empty directories).
lint_paths=()
for d in src tests bench; do
    [ -d "$d" ] && lint_paths+=("$d")
done

echo "== ruff check ${lint_paths[*]}"
.venv/bin/ruff check "${lint_paths[@]}" || failed+=(ruff)

echo "== mypy"
.venv/bin/mypy || failed+=(mypy)

echo "== pytest"
.venv/bin/pytest -n 2 -q "$@" || failed+=(pytest)

if [ "${#failed[@]}" -gt 0 ]; then
    echo "test.sh: FAILED steps: ${failed[*]}" >&2
    exit 1
fi
