#!/usr/bin/env bash
# Stop our local Orthanc PACS (see orthanc.sh) by the PID file in its work dir, e.g.
#   deployments/local/stop-orthanc.sh --work-dir /tmp/orthanc
exec bash "$(dirname "${BASH_SOURCE[0]}")/orthanc.sh" stop "$@"
