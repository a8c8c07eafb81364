#!/usr/bin/env bash
# Start an MLflow tracking server (REST API + UI + proxied artifacts) for psydef.
#   BACKEND_STORE_URI      sqlite:///mlflow.db (default) or postgresql://USER@DBHOST:5432/DB
#                          (pip install -e ".[postgres]"). Keep the password out of the URI: libpq reads
#                          PGPASSWORD or ~/.pgpass / PGPASSFILE. A password in the URI still stays off the
#                          command line (the URI reaches mlflow as MLFLOW_BACKEND_STORE_URI) and is masked
#                          in what this script prints (psydef.core.secrets.redact_uri: user:***@, ?password=***).
#   ARTIFACTS_DESTINATION  where the server keeps artifacts (default ./mlartifacts; s3://..., gs://... with
#                          the cloud's credentials in the environment)
#   HOST                   127.0.0.1 (default: loopback only). Another address is refused unless
#                          ALLOWED_HOSTS names the host names clients use (MLflow's --allowed-hosts).
#   PORT (5000), WORKERS (1), PID_FILE (mlflow-server.pid)
#   FOREGROUND=1           exec the server in the foreground (containers, systemd, tests) instead of
#                          starting it in the background in its own process group.
# Then point clients at it: export MLFLOW_TRACKING_URI=http://$HOST:$PORT
# Stop a background server with its whole process group (mlflow spawns uvicorn workers):
#   kill -TERM -- -"$(cat mlflow-server.pid)"
set -euo pipefail
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-5000}"
WORKERS="${WORKERS:-1}"
BACKEND_STORE_URI="${BACKEND_STORE_URI:-sqlite:///mlflow.db}"
ARTIFACTS_DESTINATION="${ARTIFACTS_DESTINATION:-./mlartifacts}"
PID_FILE="${PID_FILE:-mlflow-server.pid}"
ALLOWED_HOSTS="${ALLOWED_HOSTS:-}"

case "$HOST" in
  127.0.0.1 | localhost | ::1) ;;
  *) if [ -z "$ALLOWED_HOSTS" ]; then
       echo "start_server.sh: HOST=$HOST is not loopback; set ALLOWED_HOSTS (the host names clients use) to expose it" >&2
       exit 2
     fi ;;
esac

export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
# psydef runs no server-side jobs (GenAI scorers, trace rollups): no job runner and its huey workers.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
# The store URI goes through the environment, not argv: `ps` shows every process's command line.
export MLFLOW_BACKEND_STORE_URI="$BACKEND_STORE_URI"
args=(server --host "$HOST" --port "$PORT" --workers "$WORKERS"
      --artifacts-destination "$ARTIFACTS_DESTINATION" --serve-artifacts)
if [ -n "$ALLOWED_HOSTS" ]; then args+=(--allowed-hosts "$ALLOWED_HOSTS"); fi

# The store URI as printed: psydef's one mask (user:***@, ?password=***), run by the Python that runs
# mlflow, reading the URI from the environment; hidden altogether if that fails.
shown_store="$(PYTHONPATH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" python -c \
  'import os; from psydef.core.secrets import redact_uri; print(redact_uri(os.environ["MLFLOW_BACKEND_STORE_URI"]))' \
  2>/dev/null)" || shown_store="(hidden)"
if [ "${FOREGROUND:-0}" = 1 ]; then
  echo "mlflow server (pid $$) on http://$HOST:$PORT (store $shown_store, artifacts $ARTIFACTS_DESTINATION)"
  exec mlflow "${args[@]}"
fi
set -m  # job control: the background server leads its own process group, so one kill stops it all
mlflow "${args[@]}" &
echo $! > "$PID_FILE"
echo "mlflow server pid $(cat "$PID_FILE") on http://$HOST:$PORT (store $shown_store, artifacts $ARTIFACTS_DESTINATION)"
echo "stop it with: kill -TERM -- -$(cat "$PID_FILE")"
