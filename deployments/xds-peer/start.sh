#!/usr/bin/env bash
# Start pacsflow's XDS.b peer in the background on 127.0.0.1 and wait until it answers.
#
#   deployments/xds-peer/start.sh [PORT]
#
# Environment (all optional):
#   XDS_PEER_PORT                TCP port on 127.0.0.1 (the argument wins)          (default 8095)
#   XDS_PEER_RUN_DIR             PID file, log file, the jar it runs               (default <repo>/var/xds-peer)
#   XDS_PEER_ASSIGNING_AUTHORITY patient ID authority (OID) the registry accepts    (default: application.properties)
#   XDS_PEER_REPOSITORY_ID       repositoryUniqueId of the repository              (default: application.properties)
#   XDS_PEER_RAD69_DIR           folder of <SOP Instance UID>.dcm for the stand-in RAD-69 source (default none)
#   XDS_PEER_START_TIMEOUT       seconds to wait for every WSDL                     (default 240)
#   XDS_PEER_JAVA_OPTS           JVM options (default "-Xms128m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1")
# Builds first if needed (build.sh). Ready means every /services/<svc>?wsdl answers 200 with its
# WSDL: Tomcat answers before CXF has published the services, and CXF answers 200 with an empty
# body for a moment after publishing one. Files in the run dir: xds-peer.pid, xds-peer.log
# (the previous one kept as xds-peer.log.1), xds-peer.url (the base URL once ready), and a copy of
# the jar (a rebuild never changes the jar under a running peer).
# Exit status: 0 ready; 1 failed (log tail printed); 3 already running from this run dir.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PORT="${1:-${XDS_PEER_PORT:-8095}}"
TIMEOUT="${XDS_PEER_START_TIMEOUT:-240}"
JAVA_OPTS="${XDS_PEER_JAVA_OPTS:--Xms128m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1}"
BASE_URL="http://127.0.0.1:$PORT/services"

[[ "$PORT" =~ ^[0-9]+$ ]] && ((PORT > 0 && PORT < 65536)) || { err "the port must be 1-65535, got '$PORT'"; exit 1; }
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || { err "XDS_PEER_START_TIMEOUT must be whole seconds, got '$TIMEOUT'"; exit 1; }

# GET $1; true when it answers HTTP 200 with a WSDL. For a second or two after a service is
# published CXF answers 200 with an empty body, so the status alone is not enough.
wsdl_ok() { curl -fsS --max-time 10 "$1" 2>/dev/null | grep "definitions" >/dev/null; }
all_ready() {
  local svc
  for svc in "${SERVICES[@]}"; do
    wsdl_ok "$BASE_URL/$svc?wsdl" || return 1
  done
}

command -v curl >/dev/null 2>&1 || { err "curl not found on PATH (the readiness check uses it)"; exit 1; }
mkdir -p "$RUN_DIR"
use_run_dir "$(cd "$RUN_DIR" && pwd)"

refuse_if_running "$PORT" "choose another port"

"$HERE/build.sh" || fail "build failed"
RUN_JAR="$RUN_DIR/pacsflow-xds-peer.jar"
cp -f "$JAR" "$RUN_JAR.tmp" && mv -f "$RUN_JAR.tmp" "$RUN_JAR"

cmd=(java)
# shellcheck disable=SC2206  # JAVA_OPTS is a list of options
cmd+=($JAVA_OPTS)
cmd+=(-jar "$RUN_JAR" serve --port "$PORT")
[[ -n "${XDS_PEER_ASSIGNING_AUTHORITY:-}" ]] && cmd+=("--xds-peer.assigning-authority=$XDS_PEER_ASSIGNING_AUTHORITY")
[[ -n "${XDS_PEER_REPOSITORY_ID:-}" ]] && cmd+=("--xds-peer.repository-unique-id=$XDS_PEER_REPOSITORY_ID")
[[ -n "${XDS_PEER_RAD69_DIR:-}" ]] && cmd+=("--xds-peer.rad69-dir=$(cd "$XDS_PEER_RAD69_DIR" && pwd)")

say "starting on 127.0.0.1:$PORT, log $LOG"
launch "${cmd[@]}"
wait_ready all_ready "$TIMEOUT" "every WSDL under $BASE_URL"
echo "$BASE_URL" >"$URL_FILE"
say "ready: $BASE_URL/{$(IFS=,; echo "${SERVICES[*]}")} (pid $SERVER_PID, $READY_AFTER s)"
