#!/usr/bin/env bash
# Serve the last logged run with `mlflow models serve` (after checking its
# SHA-256, as `make serve` does), ask it the tutorial's question through
# /invocations, print the answer, stop the server.
set -euo pipefail
: "${RUN_ID:?RUN_ID is required (make demo sets it)}"
PORT="${PORT:-6000}"
LOG=.serve.log

python mlflow_dspy.py serve -m "runs:/${RUN_ID}/model" -p "$PORT" --env-manager local >"$LOG" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT

for _ in $(seq 1 240); do
  if curl -sf "http://127.0.0.1:${PORT}/ping" >/dev/null; then break; fi
  if ! kill -0 "$server" 2>/dev/null; then echo "the server exited; see $LOG" >&2; tail -20 "$LOG" >&2; exit 1; fi
  sleep 0.5
done

body='{"messages": [{"content": "what is 2 + 2?", "role": "user"}]}'
echo "POST /invocations $body"
response=$(curl -sS "http://127.0.0.1:${PORT}/invocations" -H "Content-Type:application/json" --data "$body")
echo "$response"
python3 - "$response" <<'PY'
import json, sys
content = json.loads(sys.argv[1])["choices"][0]["message"]["content"]
print("answer:", json.loads(content).get("answer", content))
PY
