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

TIMEOUT="${XDS_PEER_STOP_TIMEOUT:-30}"

if [[ ! -f "$PID_FILE" ]]; then
  say "not running (no PID file in $RUN_DIR)"
  exit 0
fi
if ! pid="$(server_pid)"; then
  say "not running (stale PID file: pid $(cat "$PID_FILE" 2>/dev/null || echo '?') is gone or not the peer); removing it"
  rm -f "$PID_FILE" "$URL_FILE"
  exit 0
fi

say "stopping pid $pid ..."
kill -TERM "$pid" 2>/dev/null || true
start=$SECONDS
while alive "$pid"; do
  if ((SECONDS - start >= TIMEOUT)); then
    say "still running after ${TIMEOUT} s: sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 1
    if alive "$pid"; then
      err "pid $pid survived SIGKILL"
      exit 1
    fi
    break
  fi
  sleep 0.2
done
rm -f "$PID_FILE" "$URL_FILE"
say "stopped (pid $pid, $((SECONDS - start)) s)"
