#!/usr/bin/env bash
# Set up everything and run the checks CI runs: peers, venv, lint, types, tests.
# Extra arguments go to pytest (e.g. scripts/test.sh -k ingest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-peers.sh
bash scripts/setup.sh --dev
.venv/bin/ruff check .
.venv/bin/mypy
mkdir -p test-artifacts
.venv/bin/pytest --junitxml=test-artifacts/junit.xml "$@"
