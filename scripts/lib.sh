# shellcheck shell=bash
# scripts/lib.sh - sourced by scripts/test and scripts/demo: the machine setup both need.
#   pw_ensure_packages PKG… the Debian packages given (apt-get; root only, CI runs as root)
#   pw_ensure_pgbouncer_124 PgBouncer 1.24 into .cache/pgbouncer-1.24 (scripts/pgbouncer-debian13.sh)
#   pw_ensure_venv          .venv with `pip install -e '.[test]'` (redone when pyproject.toml changes)
# Idempotent and quick when everything is already there.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${POOLWATCH_VENV:-$REPO_ROOT/.venv}
PYTHON=${PYTHON:-python3}
PGBOUNCER_124_DIR=$REPO_ROOT/.cache/pgbouncer-1.24

# Debian packages the demo and the tests need. Add new ones here, one per line.
PACKAGES=(
  pgbouncer       # PgBouncer 1.18: /usr/sbin/pgbouncer
  postgresql-15   # initdb and postgres for the throwaway servers of poolwatch.localcluster
)
# ... and those only the tests need (scripts/test installs both lists, scripts/demo the first).
TEST_PACKAGES=(
  chromium        # headless browser: tests/test_checklist_html.py renders /checklist without JavaScript
  prometheus      # promtool and a real Prometheus: rules, dashboard and end-to-end alert tests
  prometheus-alertmanager  # a real Alertmanager for the end-to-end alert test
)

pw_log() { printf '[%s %(%H:%M:%S)T] %s\n' "$(basename "$0")" -1 "$*" >&2; }

pw_missing_packages() {
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || echo "$pkg"
  done
}

pw_ensure_packages() {
  local missing
  mapfile -t missing < <(pw_missing_packages "$@")
  ((${#missing[@]})) || return 0
  if [[ $(id -u) != 0 ]]; then
    pw_log "missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install -y ${missing[*]})"
    return 1
  fi
  pw_log "apt-get install ${missing[*]}"
  # The packages must not start services of their own (pgbouncer on 6432, a 'main' PostgreSQL
  # cluster on 5432): the tests start throwaway servers. policy-rc.d exit 101 = action forbidden.
  local policy=/usr/sbin/policy-rc.d made_policy=0 rc=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
  fi
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  } >&2 || rc=$?
  if ((made_policy)); then rm -f "$policy"; fi
  return "$rc"
}

pw_ensure_pgbouncer_124() {
  local launcher
  if launcher=$(bash "$REPO_ROOT/scripts/pgbouncer-debian13.sh" "$PGBOUNCER_124_DIR"); then
    pw_log "PgBouncer 1.24: $launcher"
  else
    pw_log "WARNING: PgBouncer 1.24 could not be installed; its tests skip (and fail when CI=true)"
  fi
}

pw_ensure_venv() {
  if [[ ! -x $VENV/bin/python ]]; then
    pw_log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp=$VENV/.poolwatch-install want
  want="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1) $REPO_ROOT"
  if [[ -f $stamp && $(<"$stamp") == "$want" ]] &&
    "$VENV/bin/python" -c 'import sys, poolwatch; sys.exit(not poolwatch.__file__.startswith(sys.argv[1]))' \
      "$REPO_ROOT/src/" 2>/dev/null; then
    return 0
  fi
  pw_log "pip install -e '.[test]' into $VENV"
  (cd "$REPO_ROOT" && "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]') >&2
  printf '%s\n' "$want" >"$stamp"
}
