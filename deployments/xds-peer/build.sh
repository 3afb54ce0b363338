#!/usr/bin/env bash
# Build pacsflow's XDS.b peer (IPF 5.1.0) when it is missing or out of date.
#
#   deployments/xds-peer/build.sh [--force]
#
# mvn -q -B package -DskipTests -> target/pacsflow-xds-peer.jar (one runnable Spring Boot jar, ~61 MB),
# skipped when the jar is newer than pom.xml and src/. Needs java 17+ and, to build, mvn.
# Works from any current directory; one build at a time (flock).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TARGET="$HERE/target"
JAR="$TARGET/pacsflow-xds-peer.jar"

FORCE=0
case "${1:-}" in
  --force) FORCE=1 ;;
  "") ;;
  -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
  *) echo "build.sh: unknown argument: $1 (use --force or nothing)" >&2; exit 2 ;;
esac

say() { echo "[xds-peer build] $*"; }
die() { echo "[xds-peer build] ERROR: $*" >&2; exit 1; }

command -v java >/dev/null 2>&1 || die "java not found on PATH: install a JDK 17 or newer (Debian: openjdk-17-jdk-headless)"

mkdir -p "$TARGET"
exec 9>"$TARGET/.build.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
fi

if [[ $FORCE -eq 0 && -f "$JAR" && -z "$(find "$HERE/pom.xml" "$HERE/src" -newer "$JAR" -print -quit)" ]]; then
  say "up to date: $JAR"
  exit 0
fi
command -v mvn >/dev/null 2>&1 || die "mvn (Maven 3.8+) not found on PATH, and $JAR is missing or older than its sources (Debian: apt-get install maven)"
say "packaging with Maven (the first run downloads ~70 MB from Maven Central into ~/.m2) ..."
start=$SECONDS
(cd "$HERE" && mvn -q -B -Dstyle.color=never package -DskipTests) || die "mvn package failed (see the Maven output above)"
[[ -f "$JAR" ]] || die "mvn package succeeded but $JAR is missing"
say "built $JAR ($(du -h "$JAR" | cut -f1)) in $((SECONDS - start)) s"
