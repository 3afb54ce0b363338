#!/usr/bin/env bash
# Our local Orthanc PACS from a shell, from any directory:
#   deployments/local/orthanc.sh start|stop|status [--work-dir DIR] [--dicom-port N] [--http-port N] ...
# (start-orthanc.sh and stop-orthanc.sh call it). It runs `python -m pacsflow.deployments.local.orthanc`
# with $PACSFLOW_PYTHON, else the repository's .venv, else python3; pacsflow must be installed there.
# Default work dir: var/orthanc at the repository root.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PACSFLOW_PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="python3"; fi
fi
exec "$py" -m pacsflow.deployments.local.orthanc "$@"
