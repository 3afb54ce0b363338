#!/usr/bin/env bash
# Start our local Orthanc PACS. Works from any directory; extra arguments are passed on, e.g.
#   deployments/local/start-orthanc.sh --work-dir /tmp/orthanc --dicom-port 4242 --http-port 8042
# Default work dir: var/orthanc at the repository root. Python: $PACSFLOW_PYTHON, else the repo's .venv.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py="${PACSFLOW_PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="python3"; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m deployments.local.orthanc start "$@"
