#!/usr/bin/env bash
# Create .venv with the pinned dependencies (constraints.txt) and install cxr-gateway into it.
#   scripts/setup.sh            runtime only (serve, listen, worker, web, predict, send, ...)
#   scripts/setup.sh --training with train, evaluate and calibrate's extra (scikit-learn, SciPy,
#                               Matplotlib)
#   scripts/setup.sh --dev      the training extra, the test and lint tools, and the FHIR test
#                               server (npm ci)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip==26.3"
extra=""
[ "${1:-}" = "--training" ] && extra="[training]"
[ "${1:-}" = "--dev" ] && extra="[dev,training]"
.venv/bin/python -m pip install -q -c constraints.txt -e ".${extra}"
if [ "${1:-}" = "--dev" ]; then
  bash tools/fhir-test-server/install.sh
fi
echo "setup: done (.venv)"
