#!/usr/bin/env bash
# Build pacsflow's FHIR server (HAPI FHIR JPA, R4, H2) when it is missing or out of date.
#
#   deployments/fhir-server/build.sh [--force]
#
# Steps, each skipped when its output is newer than its inputs:
#   1. mvn -q -B package -DskipTests   -> target/pacsflow-fhir-server.jar (the single runnable jar)
#   2. unpack that jar                  -> target/app/ (same classes, plain class path: starts faster)
#   3. one training start (in-memory, a free port, one metadata + one $validate request, then exit)
#                                       -> target/app/pacsflow-fhir-server.jsa (class-data-sharing archive)
# Steps 2-3 only speed up start.sh; if they fail, start.sh falls back to the jar and says so.
# Needs: java 17+ always, mvn only when step 1 must run. Works from any current directory.
# Environment: FHIR_JAVA_OPTS (JVM options; keep them equal to start.sh's so the archive is accepted).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TARGET="$HERE/target"
JAR="$TARGET/pacsflow-fhir-server.jar"
APP="$TARGET/app"
APP_JAR="$APP/pacsflow-fhir-server.jar"
CDS="$APP/pacsflow-fhir-server.jsa"
JAVA_OPTS="${FHIR_JAVA_OPTS:--Xms256m -Xmx1g -XX:+UseSerialGC}"

LABEL=fhir-server
# shellcheck source=../launcher.sh
source "$HERE/../launcher.sh"
begin_build "$TARGET" 15 "$@"

# 1. The jar: rebuild when missing, or when pom.xml or anything under src/ is newer.
maven_package "$HERE" "$JAR" "~250 MB"
needs_package=$PACKAGED

# 2. Unpacked copy with a plain class path (class-data sharing cannot read jars nested in a jar).
if [[ $needs_package -eq 1 || ! -f "$APP_JAR" || "$JAR" -nt "$APP_JAR" ]]; then
  say "unpacking to $APP ..."
  rm -rf "$APP" "$APP.tmp"
  if java -Djarmode=tools -jar "$JAR" extract --destination "$APP.tmp" >/dev/null \
      && [[ -f "$APP.tmp/pacsflow-fhir-server.jar" ]]; then
    mv "$APP.tmp" "$APP"
  else
    rm -rf "$APP.tmp"
    say "WARNING: could not unpack the jar; start.sh will run $JAR directly (slower start)"
    exit 0
  fi
fi

# 3. Class-data-sharing archive, recorded by one real start that exits by itself.
if [[ ! -f "$CDS" || "$APP_JAR" -nt "$CDS" ]]; then
  say "recording the class-data-sharing archive (one in-memory start on a free port, about 20-60 s) ..."
  start=$SECONDS
  rm -f "$CDS" "$CDS.tmp"
  # shellcheck disable=SC2086  # JAVA_OPTS is a list of options
  if java $JAVA_OPTS -Xlog:cds=off -XX:ArchiveClassesAtExit="$CDS.tmp" -jar "$APP_JAR" \
      --port 0 --in-memory --exit-when-ready >"$APP/cds-training.log" 2>&1 && [[ -s "$CDS.tmp" ]]; then
    mv "$CDS.tmp" "$CDS"
    say "archive ready ($(du -h "$CDS" | cut -f1)) in $((SECONDS - start)) s; the server answered metadata and \$validate"
  else
    rm -f "$CDS.tmp"
    tail -n 40 "$APP/cds-training.log" >&2 || true
    die "the training start failed its self-check (metadata + \$validate); log above, full log: $APP/cds-training.log"
  fi
else
  say "up to date: $CDS"
fi
