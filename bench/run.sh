#!/usr/bin/env bash
# The benchmark in one command (see bench/run.py and docs/benchmarks.md). Runs as root on Debian 12:
# throwaway PostgreSQL and PgBouncer servers on loopback, poolwatch and its peers side by side.
#   bench/run.sh                                   # 100, 2,000, 10,000 pools; 100, 1,000 backends
#   bench/run.sh --huge 100000 --markdown docs/benchmarks.md
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet -e '.[test]'
fi
ulimit -n "$(ulimit -Hn)"
export POOLWATCH_BENCH_SH=1
exec .venv/bin/python -m bench.run "$@"
