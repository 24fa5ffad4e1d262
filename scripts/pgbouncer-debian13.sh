#!/bin/bash
# Installs the PgBouncer of Debian 13 (1.24.x) into DIR from Debian's own packages, runnable on this
# Debian 12 machine beside the system's 1.18, and prints the path of its launcher. Idempotent.
# It uses a private apt state under DIR; the system's apt configuration is not changed.
# usage: pgbouncer-debian13.sh DIR        then: "$(pgbouncer-debian13.sh DIR)" --version
#
# poolwatch: copied from the shared tools and adapted:
#   - DIR defaults to <repo>/.cache/pgbouncer-1.24 (gitignored), which is where
#     poolwatch.localcluster.find_pgbouncer_124() and the test suite look for it;
#   - the multiarch triplet and dynamic loader come from dpkg instead of being x86_64 only;
#   - the launcher is written atomically, so an interrupted install is simply redone.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:-$REPO_ROOT/.cache/pgbouncer-1.24}
DIR=$(mkdir -p "$DIR" && cd "$DIR" && pwd)
LAUNCHER=$DIR/pgbouncer
if [[ -x $LAUNCHER ]] && "$LAUNCHER" --version >/dev/null 2>&1; then echo "$LAUNCHER"; exit 0; fi
# The same mirror the system uses, with the Debian 13 suite.
URI=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[[ -n $URI ]] || URI=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list)
APT=$DIR/apt; mkdir -p "$APT/lists/partial" "$DIR/debs" "$DIR/root"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $URI trixie main" > "$APT/sources.list"
OPTS=(-o Dir::Etc::sourcelist="$APT/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$APT/lists"
      -o Dir::Cache::archives="$DIR/debs" -o APT::Sandbox::User=root)
apt-get "${OPTS[@]}" -qq update >&2
# pgbouncer and the shared libraries its binary loads (its maintainer scripts' dependencies are not needed).
PKGS=(pgbouncer libc6 libcares2 libevent-2.1-7t64 libssl3t64 libsystemd0 libpam0g libcap2 libaudit1 libcap-ng0 zlib1g libzstd1)
(cd "$DIR/debs" && apt-get "${OPTS[@]}" -qq download "${PKGS[@]/%//trixie}" >&2)
for deb in "$DIR"/debs/*.deb; do dpkg -x "$deb" "$DIR/root"; done
TRIPLET=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo "$(uname -m)-linux-gnu")
LIB=$DIR/root/usr/lib/$TRIPLET
LOADER=$(cd "$LIB" && ls ld-linux*.so.* 2>/dev/null | head -1)
[[ -n $LOADER ]] || { echo "pgbouncer-debian13.sh: no dynamic loader found in $LIB" >&2; exit 1; }
cat > "$LAUNCHER.tmp" <<SH
#!/bin/sh
# PgBouncer from Debian 13, run with its own C library.
exec "$LIB/$LOADER" --library-path "$LIB:$DIR/root/lib/$TRIPLET" "$DIR/root/usr/sbin/pgbouncer" "\$@"
SH
chmod 755 "$LAUNCHER.tmp"; mv -f "$LAUNCHER.tmp" "$LAUNCHER"; chmod -R a+rX "$DIR"
"$LAUNCHER" --version | head -1 >&2
echo "$LAUNCHER"
