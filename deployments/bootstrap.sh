#!/usr/bin/env bash
# One entry point for a fresh Debian machine:
#   deployments/bootstrap.sh demo   install, start the local Orthanc, seed it, run the nightly ingest once
#   deployments/bootstrap.sh test   install, then run the whole test suite (servers are started by the tests)
#   deployments/bootstrap.sh setup  install only
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
what="${1:-setup}"
shift || true

apt_packages=(orthanc orthanc-dicomweb dcmtk openssl)  # openssl: the TLS fault tests make their certificates
apt_packages+=(tesseract-ocr tesseract-ocr-eng)  # the default pixel policy (ocr) reads burned-in text with it
command -v java >/dev/null 2>&1 || apt_packages+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null 2>&1 || apt_packages+=(maven)
python_ok() { python3 -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; }
python_ok || apt_packages+=(python3 python3-venv)
[ "$what" = test ] && apt_packages+=(chromium)  # the run report is checked as a browser renders it
[ "$what" = test ] && apt_packages+=(postgresql)  # the shared-state tests start their own server (initdb, postgres)

missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
# A JDK or Python from elsewhere (not dpkg) is fine when the command works.
filtered=()
for p in "${missing[@]}"; do
  case "$p" in
    openjdk-*) command -v java >/dev/null 2>&1 || filtered+=("$p") ;;
    maven) command -v mvn >/dev/null 2>&1 || filtered+=("$p") ;;
    python3|python3-venv) python_ok || filtered+=("$p") ;;
    *) filtered+=("$p") ;;
  esac
done
if [ "${#filtered[@]}" -gt 0 ]; then
  echo "==> installing Debian packages: ${filtered[*]}"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${filtered[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.pacsflow-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing pacsflow and its dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip "setuptools>=77" >/dev/null
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi

export PREFECT_SERVER_ANALYTICS_ENABLED=false
export TCP_NODELAY=1
case "$what" in
  setup) echo "==> ready: .venv/bin/pacsflow --help" ;;
  demo) exec .venv/bin/pacsflow demo "$@" ;;
  test)
    if command -v java >/dev/null 2>&1 && [ -x deployments/fhir-server/build.sh ]; then
      echo "==> building the HAPI FHIR test server (first time only)"
      deployments/fhir-server/build.sh
    fi
    if command -v java >/dev/null 2>&1 && [ -x deployments/xds-peer/build.sh ]; then
      echo "==> building the IPF XDS.b test peer (first time only)"
      # a failed build only makes tests/integration/test_xds_peer.py skip, with the reason
      deployments/xds-peer/build.sh || echo "==> the XDS.b peer did not build; its tests will skip"
    fi
    exec .venv/bin/python -m pytest "$@" ;;
  *) echo "usage: $0 demo|test|setup" >&2; exit 2 ;;
esac
