#!/usr/bin/env bash
# Sets up and runs the whole test suite. Uses PostgreSQL/Redis when DATABASE_URL/REDIS_URL are set
# (CI: .ci/run starts both); otherwise the embedded default (SQLite, in-process), skipping only what needs them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_vllm.sh  # real vLLM for tests/realvllm (a failed install skips them, except in CI)
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "Installing Debian's chromium for the browser tests…"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "WARNING: could not install chromium; browser tests will be skipped."
  else
    echo "WARNING: /usr/bin/chromium is missing (sudo apt-get install chromium); browser tests will be skipped."
  fi
fi
export PLATFORM_VAR_DIR=${PLATFORM_VAR_DIR:-$PWD/var/test}
# Never the Hugging Face Hub: models are local folders (peft would look adapters' base models up; docs/configuration.md).
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
mkdir -p "$PLATFORM_VAR_DIR"
set +e
if [ $# -eq 0 ]; then
  # The whole suite in two steps: the fast lane (-m "not slow") on every core through pytest-xdist (each worker has
  # its own test database and Redis database), then the slow tests one at a time, as they were timed: subprocesses,
  # gateways under fault injection, Celery workers, browsers and training share no core well.
  # PLATFORM_TEST_WORKERS=1 runs the fast lane in one process.
  # --nomigrations: the fast lane's test databases get their tables straight from the models (0.2 s) instead of
  # replaying every migration in each worker (about 4 s each on PostgreSQL); the slow lane applies the real migrations, and
  # tests/test_settings.py checks that they match the models.
  workers=${PLATFORM_TEST_WORKERS:-auto}
  .venv/bin/python -m pytest -m "not slow" -n "$workers" --nomigrations
  rc=$?
  .venv/bin/python -m pytest -m slow
  slow_rc=$?
  if [ $rc -eq 0 ]; then rc=$slow_rc; fi
else
  .venv/bin/python -m pytest "$@"
  rc=$?
fi
# The whole suite (no arguments) also runs the real-vLLM module on the demo's SmolLM2-135M-Instruct, as the demo
# serves it: a second vLLM start and a real fine-tune, about 10 minutes on 2 cores. PLATFORM_TEST_VLLM_DEMO=0 skips
# it on a developer machine; CI always runs it.
if [ $# -eq 0 ] && [ $rc -eq 0 ] && { [ "${PLATFORM_TEST_VLLM_DEMO:-1}" != 0 ] || [ "${CI:-}" = true ]; }; then
  echo "Real vLLM on the demo model (tests/realvllm, PLATFORM_TEST_VLLM_ON=demo)…"
  PLATFORM_TEST_VLLM_ON=demo .venv/bin/python -m pytest tests/realvllm -p no:cacheprovider
  rc=$?
fi
set -e
if [ $rc -eq 5 ]; then echo "No tests were collected."; fi
exit $rc
