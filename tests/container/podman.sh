#!/usr/bin/env bash
# podman.sh - podman with this machine's flags and the project's image storage (see lib.sh).
#   tests/container/podman.sh images
#   tests/container/podman.sh run --rm --network host localhost/poolwatch:test --version
# 'run', 'create' and 'build' get the explicit --ulimit flags this machine needs.
set -euo pipefail
# shellcheck source=tests/container/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
case "${1-}" in
  run|create|build) set -- "$1" "${ULIMITS[@]}" "${@:2}" ;;
esac
exec "${PODMAN[@]}" "$@"
