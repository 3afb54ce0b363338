# Sourced by the build.sh, start.sh and stop.sh of fhir-server/ and xds-peer/ (the last two through
# their common.sh): building a Java server with Maven and running it in the background from a run
# dir, whichever server it is. The caller sets LABEL (prefix of messages); start.sh and stop.sh also
# MARKER (a word of the server's command line, so that a reused PID is never signalled), RUN_DIR,
# PID_FILE, URL_FILE and LOG.

SCRIPT="$(basename "$0" .sh)"

say() { echo "[$LABEL $SCRIPT] $*"; }
err() { echo "[$LABEL $SCRIPT] ERROR: $*" >&2; }
die() { err "$*"; exit 1; }

# Running and not a zombie (a zombie still answers kill -0).
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  stat="${stat##*) }"
  [[ "${stat:0:1}" != "Z" ]]
}

# Prints the PID from the PID file when that process is alive and is our server; fails otherwise
# (no file, a stale PID, or a PID reused by another program: never signal that one).
server_pid() {
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" && grep -qa "$MARKER" "/proc/$pid/cmdline" 2>/dev/null \
    || return 1
  echo "$pid"
}

# Error message, the log's last 40 lines, exit 1.
fail() {
  err "$*"
  if [[ -f "${LOG:-}" ]]; then
    echo "----- last 40 lines of $LOG -----" >&2
    tail -n 40 "$LOG" >&2 || true
    echo "-----" >&2
  fi
  exit 1
}

port_busy() { (exec 7<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Before a start: exit 3 if a server from this run dir runs, drop a stale PID file, exit 1 if
# 127.0.0.1:$1 is taken ($2: what to do about it).
refuse_if_running() {
  local old_pid
  if old_pid="$(server_pid)"; then
    say "already running from $RUN_DIR: pid $old_pid, $(cat "$URL_FILE" 2>/dev/null || echo 'url unknown'); stop it with stop.sh" >&2
    exit 3
  fi
  if [[ -f "$PID_FILE" ]]; then
    say "removing stale PID file (pid $(cat "$PID_FILE" 2>/dev/null || echo '?') is gone)"
    rm -f "$PID_FILE" "$URL_FILE"
  fi
  if port_busy "$1"; then
    err "something already listens on 127.0.0.1:$1; $2"
    exit 1
  fi
}

# Runs "$@" in the background in its own session (a Ctrl-C in this terminal does not reach it),
# output to the log (the previous one kept as .log.1); sets SERVER_PID and writes the PID file.
launch() {
  [[ -f "$LOG" ]] && mv -f "$LOG" "$LOG.1"
  echo "# $(date -u +%FT%TZ) $*" >"$LOG"
  if command -v setsid >/dev/null 2>&1; then
    setsid "$@" >>"$LOG" 2>&1 </dev/null &
  else
    nohup "$@" >>"$LOG" 2>&1 </dev/null &
  fi
  SERVER_PID=$!
  echo "$SERVER_PID" >"$PID_FILE"
}

# Polls the command $1 until it succeeds. Fails (log tail) when the server exits first, or after
# $2 seconds, then stopping it; $3 names what did not answer.
wait_ready() {
  local start=$SECONDS
  until "$1"; do
    if ! alive "$SERVER_PID"; then
      rm -f "$PID_FILE"
      fail "the server (pid $SERVER_PID) exited during start-up"
    fi
    if ((SECONDS - start >= $2)); then
      kill -TERM "$SERVER_PID" 2>/dev/null || true
      for _ in $(seq 1 20); do alive "$SERVER_PID" || break; sleep 0.5; done
      alive "$SERVER_PID" && kill -KILL "$SERVER_PID" 2>/dev/null || true
      rm -f "$PID_FILE"
      fail "no answer from $3 within $2 s; stopped pid $SERVER_PID"
    fi
    sleep 0.5
  done
  READY_AFTER=$((SECONDS - start))
}

# The whole of stop.sh: SIGTERM to the PID in the PID file, wait, SIGKILL after $1 seconds, then
# remove the PID file. Exits 0 stopped or nothing was running; 1 could not stop it.
stop_server() {
  local pid start
  if [[ ! -f "$PID_FILE" ]]; then
    say "not running (no PID file in $RUN_DIR)"
    exit 0
  fi
  if ! pid="$(server_pid)"; then
    say "not running (stale PID file: pid $(cat "$PID_FILE" 2>/dev/null || echo '?') is gone or not a $MARKER process); removing it"
    rm -f "$PID_FILE" "$URL_FILE"
    exit 0
  fi
  say "stopping pid $pid ..."
  kill -TERM "$pid" 2>/dev/null || true
  start=$SECONDS
  while alive "$pid"; do
    if ((SECONDS - start >= $1)); then
      say "still running after $1 s: sending SIGKILL"
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
  exit 0
}

# build.sh's first steps: its arguments ("--force" sets FORCE=1; "--help" prints lines 2-$2 of the
# script), java on PATH, and one build at a time (several test sessions may build at once): a lock
# in the target dir $1.
begin_build() {
  local target=$1 help_end=$2
  shift 2
  FORCE=0
  case "${1:-}" in
    --force) FORCE=1 ;;
    "") ;;
    -h|--help) sed -n "2,${help_end}p" "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument: $1 (use --force or nothing)" >&2; exit 2 ;;
  esac
  command -v java >/dev/null 2>&1 || die "java not found on PATH: install a JDK 17 or newer (Debian: openjdk-17-jdk-headless)"
  mkdir -p "$target"
  exec 9>"$target/.build.lock"
  if command -v flock >/dev/null 2>&1; then
    flock 9
  fi
}

# mvn package in the project dir $1 when the jar $2 is missing, older than pom.xml or anything
# under src/, or FORCE=1; $3 says what the first run downloads. Sets PACKAGED=1 when it packaged.
maven_package() {
  local project=$1 jar=$2 start
  PACKAGED=0
  if [[ $FORCE -eq 0 && -f "$jar" && -z "$(find "$project/pom.xml" "$project/src" -newer "$jar" -print -quit)" ]]; then
    say "up to date: $jar"
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || die "mvn (Maven 3.8+) not found on PATH, and $jar is missing or older than its sources (Debian: apt-get install maven)"
  say "packaging with Maven (the first run downloads $3 of dependencies from Maven Central into ~/.m2) ..."
  start=$SECONDS
  (cd "$project" && mvn -q -B -Dstyle.color=never package -DskipTests) || die "mvn package failed (see the Maven output above)"
  [[ -f "$jar" ]] || die "mvn package succeeded but $jar is missing"
  say "built $jar ($(du -h "$jar" | cut -f1)) in $((SECONDS - start)) s"
  PACKAGED=1
}
