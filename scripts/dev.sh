#!/usr/bin/env bash
# One entry point for a fresh machine:
#   scripts/dev.sh serve [uniadapter serve args]   set up .venv, then serve the embedded demo model
#   scripts/dev.sh test  [pytest args]             set up .venv (+ redis-server, PostgreSQL, chromium), then lint, type-check, test
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# The CPU wheel of torch lies on this project's machines; install it before the project so
# pip never resolves a bare `torch` to a multi-GB CUDA build. Set TORCH_SPEC to override.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

setup() {
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
  fi
  # playwright drives Debian's chromium (need_browser): never let it download a browser of its own
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
}

apt_install() {  # apt_install PACKAGE WHAT: Debian's package, when we may install it
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    # shellcheck disable=SC2086 # APT_FLAGS: optional extra flags, word-split on purpose
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${APT_FLAGS:-} "$1" >/dev/null
  else
    echo "$2 is needed for the integration tests: install it (Debian: apt-get install $1)" >&2
    return 1
  fi
}

need_redis() {
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server redis-server
}

need_browser() {  # tests/integration/test_web.py: Debian's headless chromium, driven by Playwright (no browser download)
  [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1 \
    || APT_FLAGS=--no-install-recommends apt_install chromium "Chromium (the web page tests)"
}

need_postgres() {  # the tests run initdb/pg_ctl themselves, as a non-root user, in temporary folders
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 \
    || apt_install postgresql "PostgreSQL (initdb, pg_ctl)"
}

cmd=${1:-}
shift || true
case "$cmd" in
  serve)
    setup
    exec "$VENV/bin/uniadapter" serve "$@"
    ;;
  test)
    setup
    need_redis
    need_postgres
    need_browser
    "$VENV/bin/ruff" check .
    "$VENV/bin/mypy"
    exec "$VENV/bin/pytest" "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh serve|test [args...]" >&2
    exit 64
    ;;
esac
