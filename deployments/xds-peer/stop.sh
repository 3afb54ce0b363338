#!/usr/bin/env bash
# Stop pacsflow's XDS.b peer started by start.sh: SIGTERM to the PID in the PID file, wait for it
# to exit, SIGKILL after XDS_PEER_STOP_TIMEOUT seconds (default 30), then remove the PID file.
# The store is in memory: what was submitted is gone after a stop.
#
#   deployments/xds-peer/stop.sh
#
# Environment: XDS_PEER_RUN_DIR (default <repo>/var/xds-peer), XDS_PEER_STOP_TIMEOUT.
# Exit status: 0 stopped or nothing was running; 1 could not stop it.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

stop_server "${XDS_PEER_STOP_TIMEOUT:-30}"
