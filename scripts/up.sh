#!/usr/bin/env bash
# Sets up and runs the whole platform on its embedded default: SQLite, no Redis, a filesystem Celery broker,
# the dev inference backend on a tiny model built offline. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PLATFORM_VAR_DIR=${PLATFORM_VAR_DIR:-$PWD/var}
PORT=${PORT:-8000}
BACKEND_PORT=${BACKEND_PORT:-8081}
# Links in e-mails (invitations) must point at this console, whatever its port.
export PLATFORM_PUBLIC_URL=${PLATFORM_PUBLIC_URL:-http://127.0.0.1:$PORT}
mkdir -p "$PLATFORM_VAR_DIR/log" "$PLATFORM_VAR_DIR/celery/queue" "$PLATFORM_VAR_DIR/celery/processed" "$PLATFORM_VAR_DIR/celery/control"
PY=.venv/bin/python

$PY manage.py migrate --noinput >/dev/null
MODEL_DIR="$PLATFORM_VAR_DIR/models/tiny-chat"
$PY -m serving.tinymodel "$MODEL_DIR" >/dev/null

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

$PY -m serving.devbackend --model "$MODEL_DIR" --model-id "$($PY -c "from serving.tinymodel import read_model_id; print(read_model_id('$MODEL_DIR'))")" \
  --host 127.0.0.1 --port "$BACKEND_PORT" >"$PLATFORM_VAR_DIR/log/devbackend.log" 2>&1 &
pids+=($!)
.venv/bin/celery -A portal worker -Q default,finetune --pool solo --loglevel INFO >"$PLATFORM_VAR_DIR/log/worker.log" 2>&1 &
pids+=($!)
.venv/bin/celery -A portal beat --schedule "$PLATFORM_VAR_DIR/celery/beat-schedule" --loglevel INFO >"$PLATFORM_VAR_DIR/log/beat.log" 2>&1 &
pids+=($!)

$PY manage.py demo_setup --model-path "$MODEL_DIR" --backend-url "http://127.0.0.1:$BACKEND_PORT" --console-url "http://127.0.0.1:$PORT"
echo "  Logs: $PLATFORM_VAR_DIR/log/ (dev backend, worker, beat). Ctrl-C stops everything."
echo
.venv/bin/uvicorn portal.asgi:application --host 127.0.0.1 --port "$PORT" --no-proxy-headers --log-level warning &
pids+=($!)
wait -n "${pids[@]}"
