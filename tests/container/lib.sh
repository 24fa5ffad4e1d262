# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this
# lib.sh - sourced by the container test tooling: where images live and the podman flags this
# kind of machine needs. No Docker engine and no registry here; Debian's podman works offline.
#
# Adapted from the shared container tools (make-base.sh / try.sh): every flag below was found
# by trying on a Debian 12, 2-core machine of this kind:
#   --runtime runc              crun fails: "cgroups in hybrid mode not supported"
#   --cgroup-manager cgroupfs   no systemd here
#   --events-backend file       no journald
#   --root/--runroot            all image storage under one folder ($OCI_DIR), reused across runs
#   --ulimit nofile/nproc       root here lacks CAP_SYS_RESOURCE: podman's default rlimits are refused
#                               (nproc 65536 was refused even below the hard limit; 32768 works)
# Callers add --network host to build and run (the default bridge works but changes the host's
# forwarding settings) and --format docker to build (the OCI format drops HEALTHCHECK).

CONTAINER_TOOLS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$CONTAINER_TOOLS_DIR/../.." && pwd)

# Image storage; kept between runs so the base image (and pip's layers) are reused.
OCI_DIR=${POOLWATCH_OCI_DIR:-/var/tmp/poolwatch-oci}
STORAGE_DRIVER=${STORAGE_DRIVER:-overlay}   # STORAGE_DRIVER=vfs where overlay is unavailable

# The base image made from Debian's packages, and the names a Dockerfile's FROM may use for it.
BASE_TAG=${BASE_TAG:-localhost/bookworm-python:local}
BASE_ALIASES=${BASE_ALIASES:-docker.io/library/python:3.11-slim-bookworm docker.io/library/python:3.11-slim}

PODMAN=(podman --root "$OCI_DIR/storage/root" --runroot "$OCI_DIR/storage/run"
        --storage-driver "$STORAGE_DRIVER" --cgroup-manager cgroupfs --events-backend file
        --runtime "${OCI_RUNTIME:-runc}")

_nofile=$(ulimit -Hn); _nproc=$(ulimit -Hu)
[[ $_nofile == unlimited || $_nofile -gt 1048576 ]] && _nofile=1048576
[[ $_nproc == unlimited || $_nproc -gt 32768 ]] && _nproc=32768
ULIMITS=(--ulimit "nofile=$_nofile:$_nofile" --ulimit "nproc=$_nproc:$_nproc")
unset _nofile _nproc

log() { printf '[%s %(%H:%M:%S)T] %s\n' "$(basename "$0" .sh)" -1 "$*" >&2; }
