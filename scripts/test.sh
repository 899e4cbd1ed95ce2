#!/usr/bin/env bash
# Set up everything and run the checks CI runs: peers, venv, lint, format, types, tests.
# Extra arguments go to pytest (e.g. scripts/test.sh -k ingest).
# --fast (first argument): lint, format, types and only the tests that need no peer and no
# trained model (not marked slow or peer), in about a minute, with no setup; run it before the
# full one.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fast" ]]; then
    shift
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/mypy
    exec .venv/bin/pytest -q -m "not slow and not peer" "$@"
fi
bash scripts/install-peers.sh
bash scripts/setup.sh --dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
mkdir -p test-artifacts
.venv/bin/pytest --junitxml=test-artifacts/junit.xml "$@"
