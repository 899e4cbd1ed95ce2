#!/usr/bin/env bash
# Install the real peers the tests start (Debian packages): Orthanc (PACS) with its DICOMweb
# plugin (QIDO-RS, STOW-RS server and client), DCMTK (sender and reference receiver),
# dicom3tools (dciodvfy), Redis, PostgreSQL 15, Chromium, openssl and util-linux (TLS
# certificates, namespaces and memory caps in tests). Skips what is already installed. Needs
# root (or sudo).
set -euo pipefail
packages=(orthanc orthanc-dicomweb dcmtk dicom3tools redis-server postgresql-15 chromium
  chromium-driver nodejs npm
  openssl util-linux)  # openssl: the TLS tests make a CA; util-linux: unshare, prlimit
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node.js and npm may come from elsewhere than Debian (the machine image has them).
if command -v node >/dev/null && command -v npm >/dev/null; then
  missing=("${missing[@]/nodejs}"); missing=("${missing[@]/npm}")
fi
missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))
if [ ${#missing[@]} -eq 0 ]; then
  echo "peers: all installed"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "peers: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
