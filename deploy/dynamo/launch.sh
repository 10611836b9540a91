#!/usr/bin/env bash
# inferd in an NVIDIA Dynamo deployment on one machine: a Dynamo frontend (HTTP, chat
# templates, tokenization, KV-aware routing, request migration) and N inferd workers,
# one command each. See docs/scale-out.md.
#
#   deploy/dynamo/launch.sh MODEL [WORKERS]     (default 2 workers)
#   deploy/dynamo/launch.sh --print MODEL [N]   (print the commands, run nothing)
#
# Needs: a Python with ai-dynamo 1.6.1 and inferd-dynamo (scripts/dynamo-venv makes
# one; DYNAMO_PYTHON names it, default `python3`), and inferd (INFERD_BIN, default
# target/release/inferd). Environment:
#   PORT            the frontend's HTTP port (8000)
#   ROUTER_MODE     kv (default), round-robin, random, least-loaded
#   INFERD_ARGS     extra `inferd serve` arguments for every worker (e.g. --num-blocks 4096)
#   DYN_DISCOVERY_BACKEND, DYN_FILE_KV
#                   discovery: `file` in DYN_FILE_KV (default here: one machine); use
#                   etcd (ETCD_ENDPOINTS) or kubernetes across machines, with NATS or
#                   ZMQ for events (DYN_EVENT_PLANE), as any Dynamo deployment does.
# Ctrl-C or SIGTERM stops the workers first (each leaves discovery, then finishes its
# streams), then the frontend.
set -euo pipefail
print=0
if [ "${1:-}" = "--print" ]; then
  print=1
  shift
fi
model=${1:?usage: launch.sh [--print] MODEL [WORKERS]}
workers=${2:-2}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${DYNAMO_PYTHON:-python3}
export INFERD_BIN=${INFERD_BIN:-$root/target/release/inferd}
export DYN_DISCOVERY_BACKEND=${DYN_DISCOVERY_BACKEND:-file}
export DYN_FILE_KV=${DYN_FILE_KV:-${TMPDIR:-/tmp}/inferd-dynamo-discovery}
# One machine: every plane on loopback.
export DYN_TCP_RPC_HOST=${DYN_TCP_RPC_HOST:-127.0.0.1}
export DYN_TCP_RESPONSE_STREAM_HOST=${DYN_TCP_RESPONSE_STREAM_HOST:-127.0.0.1}
export DYN_EVENT_PLANE_HOST=${DYN_EVENT_PLANE_HOST:-127.0.0.1}
export DYN_SYSTEM_HOST=${DYN_SYSTEM_HOST:-127.0.0.1}

frontend=("$python" -m dynamo.frontend --http-host 0.0.0.0 --http-port "${PORT:-8000}"
  --router-mode "${ROUTER_MODE:-kv}" --migration-limit 3)
read -r -a extra <<< "${INFERD_ARGS:-}"
worker=("$python" -m inferd_dynamo --model "$model" -- "${extra[@]}")

if [ $print = 1 ]; then
  echo "${frontend[*]}"
  for _ in $(seq "$workers"); do echo "${worker[*]}"; done
  exit 0
fi

pids=()
stop() {
  trap - INT TERM EXIT
  # Workers first: each leaves discovery and drains; then the frontend.
  for p in "${pids[@]:1}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]:1}"; do wait "$p" 2>/dev/null || true; done
  kill -TERM "${pids[0]}" 2>/dev/null || true
  wait "${pids[0]}" 2>/dev/null || true
}
trap stop INT TERM EXIT
"${frontend[@]}" &
pids+=($!)
for _ in $(seq "$workers"); do
  "${worker[@]}" &
  pids+=($!)
done
echo "frontend on :${PORT:-8000}, $workers inferd workers (discovery: $DYN_DISCOVERY_BACKEND)" >&2
wait -n "${pids[@]}"
