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

fail() {
  err "$*"
  if [[ -f "$LOG" ]]; then
    echo "----- last 40 lines of $LOG -----" >&2
    tail -n 40 "$LOG" >&2 || true
    echo "-----" >&2
  fi
  exit 1
}

[[ "$PORT" =~ ^[0-9]+$ ]] && ((PORT > 0 && PORT < 65536)) || { err "the port must be 1-65535, got '$PORT'"; exit 1; }
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || { err "XDS_PEER_START_TIMEOUT must be whole seconds, got '$TIMEOUT'"; exit 1; }

# GET $1; true when it answers HTTP 200 with a WSDL. For a second or two after a service is
# published CXF answers 200 with an empty body, so the status alone is not enough.
wsdl_ok() { curl -fsS --max-time 10 "$1" 2>/dev/null | grep "definitions" >/dev/null; }
port_busy() { (exec 7<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
all_ready() {
  local svc
  for svc in "${SERVICES[@]}"; do
    wsdl_ok "$BASE_URL/$svc?wsdl" || return 1
  done
}

command -v curl >/dev/null 2>&1 || { err "curl not found on PATH (the readiness check uses it)"; exit 1; }
mkdir -p "$RUN_DIR"
use_run_dir "$(cd "$RUN_DIR" && pwd)"

if old_pid="$(server_pid)"; then
  say "already running from $RUN_DIR: pid $old_pid, $(cat "$URL_FILE" 2>/dev/null || echo 'url unknown'); stop it with stop.sh" >&2
  exit 3
fi
if [[ -f "$PID_FILE" ]]; then
  say "removing stale PID file (pid $(cat "$PID_FILE" 2>/dev/null || echo '?') is gone)"
  rm -f "$PID_FILE" "$URL_FILE"
fi
if port_busy; then
  err "something already listens on 127.0.0.1:$PORT; choose another port"
  exit 1
fi

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

[[ -f "$LOG" ]] && mv -f "$LOG" "$LOG.1"
say "starting on 127.0.0.1:$PORT, log $LOG"
echo "# $(date -u +%FT%TZ) ${cmd[*]}" >"$LOG"
# setsid: its own session, so a Ctrl-C in this terminal does not reach it; stop.sh stops it.
if command -v setsid >/dev/null 2>&1; then
  setsid "${cmd[@]}" >>"$LOG" 2>&1 </dev/null &
else
  nohup "${cmd[@]}" >>"$LOG" 2>&1 </dev/null &
fi
pid=$!
echo "$pid" >"$PID_FILE"

start=$SECONDS
until all_ready; do
  if ! alive "$pid"; then
    rm -f "$PID_FILE"
    fail "the peer (pid $pid) exited during start-up"
  fi
  if ((SECONDS - start >= TIMEOUT)); then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do alive "$pid" || break; sleep 0.5; done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
    rm -f "$PID_FILE"
    fail "not every WSDL under $BASE_URL answered within ${TIMEOUT} s; stopped pid $pid"
  fi
  sleep 0.5
done
echo "$BASE_URL" >"$URL_FILE"
say "ready: $BASE_URL/{$(IFS=,; echo "${SERVICES[*]}")} (pid $pid, $((SECONDS - start)) s)"
