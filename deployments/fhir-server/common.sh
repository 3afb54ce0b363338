# Sourced by start.sh and stop.sh: where the server's files are and how to tell that it runs.
# Environment: FHIR_RUN_DIR (default <repo>/var/fhir-server).

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
SCRIPT="$(basename "$0" .sh)"

# The run dir's files; call again after making RUN_DIR absolute.
use_run_dir() {
  RUN_DIR="$1"
  PID_FILE="$RUN_DIR/fhir-server.pid"
  LOG="$RUN_DIR/fhir-server.log"
  URL_FILE="$RUN_DIR/fhir-server.url"
}
use_run_dir "${FHIR_RUN_DIR:-$REPO/var/fhir-server}"

say() { echo "[fhir-server $SCRIPT] $*"; }
err() { echo "[fhir-server $SCRIPT] ERROR: $*" >&2; }

# Running and not a zombie (a zombie still answers kill -0).
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  stat="${stat##*) }"
  [[ "${stat:0:1}" != "Z" ]]
}

# Prints the PID from the PID file when that process is alive and is a pacsflow FHIR server;
# fails otherwise (no file, a stale PID, or a PID reused by another program: never signal that one).
server_pid() {
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" && grep -qa pacsflow-fhir-server "/proc/$pid/cmdline" 2>/dev/null \
    || return 1
  echo "$pid"
}
