#!/usr/bin/env bash
# Start our local Orthanc PACS (see orthanc.sh); extra arguments are passed on, e.g.
#   deployments/local/start-orthanc.sh --work-dir /tmp/orthanc --dicom-port 4242 --http-port 8042
exec bash "$(dirname "${BASH_SOURCE[0]}")/orthanc.sh" start "$@"
