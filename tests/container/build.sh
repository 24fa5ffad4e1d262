#!/usr/bin/env bash
# build.sh - builds the poolwatch image from the repository's unmodified Dockerfile with podman
# (no Docker engine, no registry) and prints the image name. Reuses the base image and the
# dependency layer when present.
#   bash tests/container/build.sh            -> localhost/poolwatch:test
#   IMAGE=localhost/poolwatch:dev bash tests/container/build.sh
# pip inside the build reaches the package index only with this host's settings: they are
# passed as build secrets (pipconf, pipcert), which the Dockerfile mounts for its pip steps only.
set -euo pipefail
# shellcheck source=tests/container/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

IMAGE=${IMAGE:-localhost/poolwatch:test}
PYTHON=${PYTHON:-python3}

"${PODMAN[@]}" image exists "${BASE_ALIASES%% *}" || bash "$CONTAINER_TOOLS_DIR/make-base.sh"
mkdir -p "$OCI_DIR/work"

# ---- this host's pip settings -> build secrets (no hostname is written anywhere) ----
# index-url / extra-index-url / trusted-host / timeout / proxy as the host's pip sees them;
# file:// indexes, local find-links and constraint files are dropped (those paths are not in the build).
PIPCONF=$OCI_DIR/work/pip-build.conf
"$PYTHON" - "$PIPCONF" <<'PY'
import subprocess, sys
try:
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                         capture_output=True, text=True, timeout=60).stdout
except Exception:
    out = ""
keep = {"index-url", "extra-index-url", "trusted-host", "timeout", "default-timeout", "proxy", "retries"}
vals = {}
for line in out.splitlines():
    k, _, v = line.partition("=")
    key = k.split(".", 1)[-1]
    if key in keep:
        v = v.strip().strip("'\"")
        if key in ("index-url", "extra-index-url"):
            v = " ".join(u for u in v.split() if u.startswith(("http://", "https://")))
        if v:
            vals["timeout" if key == "default-timeout" else key] = v
with open(sys.argv[1], "w") as f:
    f.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in vals.items()))
print("pip settings passed to the build:", ", ".join(vals) or "(none)", file=sys.stderr)
PY
PIPCERT=${PIP_CERT:-$("$PYTHON" -m pip config get global.cert 2>/dev/null || true)}
[[ -n $PIPCERT && -f $PIPCERT ]] || PIPCERT=/etc/ssl/certs/ca-certificates.crt
log "CA bundle passed to the build: $PIPCERT"

# ---- labels ----
VERSION=$("$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
          "$REPO_ROOT/pyproject.toml")
REVISION=$(git -C "$REPO_ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
CREATED=$(git -C "$REPO_ROOT" log -1 --format=%cI 2>/dev/null || date -u +%Y-%m-%dT%H:%M:%SZ)

old_id=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
log "podman build $IMAGE (poolwatch $VERSION, $REVISION)"
"${PODMAN[@]}" build --pull=never --format docker --network host "${ULIMITS[@]}" \
  --secret "id=pipconf,src=$PIPCONF" --secret "id=pipcert,src=$PIPCERT" \
  --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION" --build-arg "CREATED=$CREATED" \
  --tag "$IMAGE" --file "$REPO_ROOT/Dockerfile" "$REPO_ROOT" >&2
new_id=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$IMAGE")
# The image this tag named before is now unused: drop it so repeated builds do not pile up.
if [[ -n $old_id && $old_id != "$new_id" ]]; then
  "${PODMAN[@]}" rmi "$old_id" >/dev/null 2>&1 || true
fi
# Build-stage leftovers of earlier source trees (untagged, no children) older than 3 days: the
# dependency layer under the latest build stays, so the cache keeps working.
"${PODMAN[@]}" image prune --force --filter until=72h >/dev/null 2>&1 || true
echo "$IMAGE"
