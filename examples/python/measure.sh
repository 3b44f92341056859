#!/usr/bin/env bash
# The export example's measured table: a fresh redis-server, the simulated upstream at 500 ms
# and the release proxy, on free ports of this machine; export_xlsx.py runs twice over
# 1,000 SNs (cold, then all cached) and the upstream's request count is read after each run.
# Needs redis-server and curl. Usage: examples/python/measure.sh [PYTHON]
# (PYTHON: one with requirements.txt installed; .ci/run makes target/python-venv)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python=${1:-target/python-venv/bin/python}
cargo build --release --quiet --bin discount-proxy
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_for() { # URL: until it answers, for at most 10 s
    for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done
    echo "measure: nothing answers at $1" >&2
    exit 1
}

redis_port=$(free_port)
redis-server --port "$redis_port" --save '' --appendonly no --dir "$work" >"$work/redis.log" &
pids+=($!)
sim_port=$(free_port)
target/release/discount-proxy simulate-upstream --listen "127.0.0.1:$sim_port" --latency 500ms \
    >"$work/sim.log" 2>&1 &
pids+=($!)
proxy_port=$(free_port)
target/release/discount-proxy serve --listen "127.0.0.1:$proxy_port" \
    --redis-url "redis://127.0.0.1:$redis_port/0" \
    --upstream-url "http://127.0.0.1:$sim_port/contract/?sn={sn}" >"$work/proxy.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$sim_port/stats"
wait_for "http://127.0.0.1:$proxy_port/readyz"

seq -f 'C%05g' 0 999 >"$work/sns.txt"
for run in cold warm; do
    "$python" examples/python/export_xlsx.py --proxy "http://127.0.0.1:$proxy_port" \
        -o "$work/$run.xlsx" "$work/sns.txt"
    echo "measure: $run: upstream requests so far $(curl -fs "http://127.0.0.1:$sim_port/stats")"
done
