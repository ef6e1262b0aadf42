#!/usr/bin/env bash
# Creates .venv and installs the project with its ML and test extras. Idempotent: a no-op when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "Installing Python packages into .venv (about a minute the first time)…"
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[ml,test]" 2>&1 | grep -v "is ignored: it is neither" || true
  .venv/bin/python -c "import django, torch, peft, playwright" # fail loudly if the install did not work
  rm -f .venv/.installed-*
  touch "$stamp"
fi
