# Sourced by start.sh and stop.sh: where the peer's files are (the rest is ../launcher.sh).
# Environment: XDS_PEER_RUN_DIR (default <repo>/var/xds-peer).

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
JAR="$HERE/target/pacsflow-xds-peer.jar"
LABEL=xds-peer
MARKER=pacsflow-xds-peer
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

# shellcheck source=../launcher.sh
source "$HERE/../launcher.sh"
