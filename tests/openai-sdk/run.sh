#!/usr/bin/env bash
# Compatibility test with the official `openai` Python SDK: installs it from PyPI into a
# virtualenv, starts `enclave serve` with a fixture model, and runs check.py against it.
#   tests/openai-sdk/run.sh [path/to/enclave]     (default: target/debug/enclave, built if absent)
set -euo pipefail
cd "$(dirname "$0")/../.."
ENCLAVE=${1:-target/debug/enclave}
VENV=${OPENAI_SDK_VENV:-target/openai-sdk-venv}

if [ ! -x "$ENCLAVE" ]; then
  cargo build --locked -p enclave
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "openai>=1.40,<3"

LOG=$(mktemp)
DATA=$(mktemp -d)
# A developer key, made the way an operator would; the SDK sends it as a bearer token.
OPENAI_API_KEY=$("$ENCLAVE" --data-dir "$DATA" keys create --role developer --name openai-sdk)
export OPENAI_API_KEY
"$ENCLAVE" --data-dir "$DATA" serve --model fixtures/models/qwen2 --served-model-name tiny --port 0 \
  --kv-cache-memory 64MiB --no-reasoning-split 2>"$LOG" &
PID=$!
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$LOG" "$DATA"' EXIT
for _ in $(seq 1 600); do
  grep -q '^ready:' "$LOG" && break
  kill -0 "$PID" 2>/dev/null || { cat "$LOG" >&2; exit 1; }
  sleep 0.1
done
grep -q '^ready:' "$LOG" || { echo "enclave serve did not become ready" >&2; cat "$LOG" >&2; exit 1; }
BASE=$(sed -n 's/^listening on \(http:[^ ]*\).*/\1/p' "$LOG")

"$VENV/bin/python" tests/openai-sdk/check.py "$BASE/v1"
kill -TERM "$PID"
wait "$PID"
echo "openai SDK: all checks passed"
