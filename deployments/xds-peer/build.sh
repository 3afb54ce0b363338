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

LABEL=xds-peer
# shellcheck source=../launcher.sh
source "$HERE/../launcher.sh"
begin_build "$TARGET" 8 "$@"
maven_package "$HERE" "$JAR" "~100 MB"
