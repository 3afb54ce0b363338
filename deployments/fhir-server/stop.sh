#!/usr/bin/env bash
# Stop pacsflow's FHIR server started by start.sh: SIGTERM to the PID in the PID file (Jetty stops,
# then the database is closed cleanly), wait for it to exit, SIGKILL after FHIR_STOP_TIMEOUT seconds
# (default 60), then remove the PID file.
#
#   deployments/fhir-server/stop.sh
#
# Environment: FHIR_RUN_DIR (default <repo>/var/fhir-server), FHIR_STOP_TIMEOUT.
# Exit status: 0 stopped or nothing was running; 1 could not stop it.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

stop_server "${FHIR_STOP_TIMEOUT:-60}"
