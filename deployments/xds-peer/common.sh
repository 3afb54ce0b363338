# Sourced by start.sh and stop.sh: where the peer's files are and how to tell that it runs.
# Environment: XDS_PEER_RUN_DIR (default <repo>/var/xds-peer).

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
SCRIPT="$(basename "$0" .sh)"
JAR="$HERE/target/pacsflow-xds-peer.jar"
# every web service the peer publishes; it is ready when each WSDL answers
SERVICES=(xds-iti41 xds-iti18 xds-iti43 xdsi-rad69)

# The run dir's files; call again after making RUN_DIR absolute.
use_run_dir() {
  RUN_DIR="$1"
  PID_FILE="$RUN_DIR/xds-peer.pid"
  LOG="$RUN_DIR/xds-peer.log"
  URL_FILE="$RUN_DIR/xds-peer.url"
}
use_run_dir "${XDS_PEER_RUN_DIR:-$REPO/var/xds-peer}"

say() { echo "[xds-peer $SCRIPT] $*"; }
err() { echo "[xds-peer $SCRIPT] ERROR: $*" >&2; }

# Running and not a zombie (a zombie still answers kill -0).
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  stat="${stat##*) }"
  [[ "${stat:0:1}" != "Z" ]]
}

# Prints the PID from the PID file when that process is alive and is our peer; fails otherwise
# (no file, a stale PID, or a PID reused by another program: never signal that one).
server_pid() {
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" && grep -qa pacsflow-xds-peer "/proc/$pid/cmdline" 2>/dev/null \
    || return 1
  echo "$pid"
}
