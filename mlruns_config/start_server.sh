#!/usr/bin/env bash
# Start an MLflow tracking server on loopback over psydef's store.
#   BACKEND_STORE_URI  sqlite:///mlflow.db (default) or postgresql://user@host:5432/db
#   ARTIFACTS_DESTINATION  where the server keeps artifacts (default ./mlartifacts)
#   HOST (default 127.0.0.1: loopback only), PORT (default 5000), PID_FILE (default mlflow-server.pid)
# Then point clients at it: export MLFLOW_TRACKING_URI=http://$HOST:$PORT
# Stop it with: kill "$(cat "$PID_FILE")"
set -euo pipefail
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-5000}"
BACKEND_STORE_URI="${BACKEND_STORE_URI:-sqlite:///mlflow.db}"
ARTIFACTS_DESTINATION="${ARTIFACTS_DESTINATION:-./mlartifacts}"
PID_FILE="${PID_FILE:-mlflow-server.pid}"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
mlflow server --host "$HOST" --port "$PORT" --backend-store-uri "$BACKEND_STORE_URI" \
  --artifacts-destination "$ARTIFACTS_DESTINATION" --serve-artifacts --workers 1 &
echo $! > "$PID_FILE"
echo "mlflow server pid $(cat "$PID_FILE") on http://$HOST:$PORT (store $BACKEND_STORE_URI)"
