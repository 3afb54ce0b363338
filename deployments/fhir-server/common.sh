# Sourced by start.sh and stop.sh: where the server's files are (the rest is ../launcher.sh).
# Environment: FHIR_RUN_DIR (default <repo>/var/fhir-server).

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
LABEL=fhir-server
MARKER=pacsflow-fhir-server

# The run dir's files; call again after making RUN_DIR absolute.
use_run_dir() {
  RUN_DIR="$1"
  PID_FILE="$RUN_DIR/fhir-server.pid"
  LOG="$RUN_DIR/fhir-server.log"
  URL_FILE="$RUN_DIR/fhir-server.url"
}
use_run_dir "${FHIR_RUN_DIR:-$REPO/var/fhir-server}"

# shellcheck source=../launcher.sh
source "$HERE/../launcher.sh"
