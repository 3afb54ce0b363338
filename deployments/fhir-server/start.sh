#!/usr/bin/env bash
# Start pacsflow's FHIR server in the background on 127.0.0.1 and wait until it answers.
#
#   deployments/fhir-server/start.sh
#
# Environment (all optional):
#   FHIR_PORT           TCP port on 127.0.0.1                        (default 8090)
#   FHIR_RUN_DIR        PID file, log file, default data dir         (default <repo>/var/fhir-server)
#   FHIR_DATA_DIR       H2 database directory                        (default $FHIR_RUN_DIR/data)
#   FHIR_IN_MEMORY      "true": keep nothing on disk (ignores FHIR_DATA_DIR)
#   FHIR_START_TIMEOUT  seconds to wait for /fhir/metadata           (default 240)
#   FHIR_JAVA_OPTS      JVM options (default "-Xms256m -Xmx1g -XX:+UseSerialGC":
#                       a 1 GiB heap is plenty (about 320 MB live after $validate has loaded the R4
#                       definitions; RSS 0.6-1.1 GB). The full JIT (C2) is kept: it starts about 1-2 s
#                       slower than C1-only but processes transaction Bundles about 2x faster once warm.
#                       Keep equal to build.sh's so the class-data archive is used.)
# Builds first if needed (build.sh). Files in the run dir: fhir-server.pid, fhir-server.log
# (the previous one kept as fhir-server.log.1) and fhir-server.url (the base URL once ready).
# Exit status: 0 ready; 1 failed (log tail printed); 3 already running from this run dir.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PORT="${FHIR_PORT:-8090}"
TIMEOUT="${FHIR_START_TIMEOUT:-240}"
JAVA_OPTS="${FHIR_JAVA_OPTS:--Xms256m -Xmx1g -XX:+UseSerialGC}"
BASE_URL="http://127.0.0.1:$PORT/fhir"

[[ "$PORT" =~ ^[0-9]+$ ]] && ((PORT > 0 && PORT < 65536)) || { err "FHIR_PORT must be 1-65535, got '$PORT'"; exit 1; }
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || { err "FHIR_START_TIMEOUT must be whole seconds, got '$TIMEOUT'"; exit 1; }

# GET $1; true when it answers HTTP 200. curl if present, else bash's /dev/tcp.
http_ok() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS -o /dev/null --max-time 10 "$1" 2>/dev/null
  else
    local hostport path line
    hostport="${1#http://}"; path="/${hostport#*/}"; hostport="${hostport%%/*}"
    exec 8<>"/dev/tcp/${hostport%:*}/${hostport#*:}" 2>/dev/null || return 1
    printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$hostport" >&8
    IFS= read -r -t 10 line <&8 || line=""
    exec 8<&- 8>&-
    [[ "$line" == *" 200"* ]]
  fi
}
metadata_ok() { http_ok "$BASE_URL/metadata"; }

mkdir -p "$RUN_DIR"
use_run_dir "$(cd "$RUN_DIR" && pwd)"

refuse_if_running "$PORT" "choose another FHIR_PORT"

"$HERE/build.sh" || fail "build failed"

APP_JAR="$HERE/target/app/pacsflow-fhir-server.jar"
CDS="$HERE/target/app/pacsflow-fhir-server.jsa"
JAR="$HERE/target/pacsflow-fhir-server.jar"
cmd=(java)
# shellcheck disable=SC2206  # JAVA_OPTS is a list of options
cmd+=($JAVA_OPTS)
if [[ -f "$APP_JAR" && ! "$JAR" -nt "$APP_JAR" ]]; then
  [[ -f "$CDS" ]] && cmd+=("-XX:SharedArchiveFile=$CDS")
  cmd+=(-jar "$APP_JAR")
else
  say "target/app is missing or stale: running the single jar (slower start)"
  cmd+=(-jar "$JAR")
fi
cmd+=(--port "$PORT")
if [[ "${FHIR_IN_MEMORY:-false}" == "true" ]]; then
  cmd+=(--in-memory)
  storage="in memory"
else
  DATA_DIR="${FHIR_DATA_DIR:-$RUN_DIR/data}"
  mkdir -p "$DATA_DIR"
  DATA_DIR="$(cd "$DATA_DIR" && pwd)"
  cmd+=(--data-dir "$DATA_DIR")
  storage="H2 files in $DATA_DIR"
fi

say "starting on 127.0.0.1:$PORT ($storage), log $LOG"
launch "${cmd[@]}"
wait_ready metadata_ok "$TIMEOUT" "$BASE_URL/metadata"
echo "$BASE_URL" >"$URL_FILE"
say "ready: $BASE_URL (pid $SERVER_PID, $READY_AFTER s)"
