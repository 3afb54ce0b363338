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

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
RUN_DIR="${FHIR_RUN_DIR:-$REPO/var/fhir-server}"
TIMEOUT="${FHIR_STOP_TIMEOUT:-60}"
PID_FILE="$RUN_DIR/fhir-server.pid"
URL_FILE="$RUN_DIR/fhir-server.url"

say() { echo "[fhir-server stop] $*"; }
# Running and not a zombie (a zombie still answers kill -0).
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  stat="${stat##*) }"
  [[ "${stat:0:1}" != "Z" ]]
}

if [[ ! -f "$PID_FILE" ]]; then
  say "not running (no PID file in $RUN_DIR)"
  exit 0
fi
pid="$(cat "$PID_FILE" 2>/dev/null || true)"
if ! [[ "$pid" =~ ^[0-9]+$ ]] || ! alive "$pid"; then
  say "not running (stale PID file, pid ${pid:-?}); removing it"
  rm -f "$PID_FILE" "$URL_FILE"
  exit 0
fi
# Never signal a process that merely reused the PID.
if ! grep -qa pacsflow-fhir-server "/proc/$pid/cmdline" 2>/dev/null; then
  say "pid $pid is not a pacsflow FHIR server (PID reused?); removing the stale PID file"
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
      echo "[fhir-server stop] ERROR: pid $pid survived SIGKILL" >&2
      exit 1
    fi
    break
  fi
  sleep 0.2
done
rm -f "$PID_FILE" "$URL_FILE"
say "stopped (pid $pid, $((SECONDS - start)) s)"
