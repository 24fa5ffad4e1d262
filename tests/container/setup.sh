#!/usr/bin/env bash
# setup.sh - installs what the container tests need from Debian's packages. Idempotent: does
# nothing (and contacts nothing) when everything is already there. Run as root.
#   bash tests/container/setup.sh
# podman/buildah build and run images without a Docker engine; mmdebstrap makes the base
# image from Debian's packages (make-base.sh); runc because crun fails on this kind of host;
# uidmap, conmon, catatonit and the CNI plugins are what podman needs at run time.
set -euo pipefail
# shellcheck source=tests/container/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PKGS=(podman buildah mmdebstrap runc uidmap crun conmon catatonit containernetworking-plugins)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  log "all present: ${PKGS[*]}"
  exit 0
fi
if [[ $(id -u) != 0 ]]; then
  log "missing ${missing[*]}; run this as root (apt-get install)"
  exit 1
fi
log "installing ${missing[*]} (apt)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
log "installed: $(podman --version), $(buildah --version | cut -d' ' -f1-3), $(runc --version | head -1)"
