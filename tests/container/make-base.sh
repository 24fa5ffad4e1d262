#!/usr/bin/env bash
# make-base.sh - makes the base image "python:3.11-slim-bookworm" from Debian's packages alone
# (mmdebstrap: bookworm + python3 + python3-venv + ca-certificates) and imports it into the
# project's podman storage, so the unmodified Dockerfile builds with --pull=never and no
# registry. Idempotent: reuses the image when present (FORCE=1 rebuilds). 35-55 s from nothing.
#   bash tests/container/setup.sh && bash tests/container/make-base.sh
#
# The python inside is Debian bookworm's python3 (3.11) with venv, standing in for the official
# python:3.11-slim-bookworm (same Debian release and Python minor version; paths differ:
# /usr/bin/python3 instead of /usr/local/bin/python3, which a venv-based Dockerfile never sees).
# The apt mirror is read from the host's apt sources; no hostname is written here.
#
# Adapted from the shared container tools' make-base.sh: storage location and flags from lib.sh;
# packages are installed by setup.sh.
set -euo pipefail
# shellcheck source=tests/container/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SUITE=${SUITE:-bookworm}
PACKAGES=${PACKAGES:-python3,python3-venv,python-is-python3,ca-certificates}

if ! command -v podman >/dev/null || ! command -v mmdebstrap >/dev/null; then
  bash "$CONTAINER_TOOLS_DIR/setup.sh"
fi
mkdir -p "$OCI_DIR/storage" "$OCI_DIR/work"

if [[ "${FORCE:-0}" != 1 ]] && "${PODMAN[@]}" image exists "$BASE_TAG"; then
  log "$BASE_TAG already exists (FORCE=1 to rebuild)"
else
  # Host apt sources: deb822 files first, else one-line sources.list entries.
  mirrors=()
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    grep -qE "^Suites:.*\b${SUITE}\b" "$f" && mirrors+=("$f")
  done
  if ((${#mirrors[@]} == 0)); then
    while read -r line; do mirrors+=("$line"); done < <(
      grep -hE "^deb .*\s${SUITE}(-updates|-security)?\s" /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
  fi
  ((${#mirrors[@]})) || { log "no apt source for $SUITE found on this host"; exit 1; }
  log "mirrors from host: ${mirrors[*]}"

  # The host's Valid-Until relaxation (a snapshot mirror needs it), if it has one.
  aptopts=()
  if apt-config dump | grep '^Acquire::Check-Valid-Until "false"' >/dev/null; then   # no -q: SIGPIPE+pipefail
    aptopts+=(--aptopt='Acquire::Check-Valid-Until "false"')
  fi

  tarball="$OCI_DIR/work/$SUITE-python.tar"
  rm -f "$tarball"
  log "mmdebstrap $SUITE ($PACKAGES) -> $tarball"
  # shellcheck disable=SC2016  # "$1" is expanded by mmdebstrap's hook, not here
  TMPDIR="$OCI_DIR/work" mmdebstrap --quiet --variant=apt --mode=root \
    --include="$PACKAGES" \
    "${aptopts[@]}" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --customize-hook='rm -f "$1/etc/resolv.conf" "$1/etc/hostname"' \
    "$SUITE" "$tarball" "${mirrors[@]}"

  log "podman import -> $BASE_TAG"
  "${PODMAN[@]}" import --quiet \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    "$tarball" "$BASE_TAG" >/dev/null
  rm -f "$tarball"
  "${PODMAN[@]}" image prune -f >/dev/null   # a previous (now untagged) base
fi

for a in $BASE_ALIASES; do
  "${PODMAN[@]}" tag "$BASE_TAG" "$a"
done
log "base ready: $BASE_TAG = $BASE_ALIASES"
