#!/usr/bin/env bash
# Compares two builds of `cohort` on this machine, alternating them run by run (the
# machine's speed drifts from minute to minute, so only alternated runs compare).
#
# Usage: scripts/bench-ab.sh small|big BIN_A BIN_B [ROUNDS]
#   small: tiny-onnx (64→256→10, 2 replicas × 1 thread) and the demo `mlp`, concurrency 16,
#          5 s each (the README's rows for them).
#   big:   the 25M-parameter MLP (1 replica × 2 threads, batch ≤ 32, 4 ms queue delay),
#          concurrency 64, 16 s, KServe binary tensors, with --raw-onnx (vs_raw), and the
#          CPU the node's HTTP workers (threads `cohort-worker`) spent per request.
# Each run starts a fresh node on 127.0.0.1 (port 0 is not possible here: the bench needs
# the address, so a free port is picked), prints its idle VmRSS 3 s after /readyz,
# loads it with BIN_A's `cohort bench`, and stops it.
# Example, mimalloc (this tree) against glibc malloc (the build of commit 0c044b3):
#   git worktree add /tmp/glibc 0c044b3 && cargo build --release --manifest-path /tmp/glibc/Cargo.toml
#   scripts/bench-ab.sh small target/release/cohort /tmp/glibc/target/release/cohort 3
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?small or big}
bins=("${2:?BIN_A}" "${3:?BIN_B}")
rounds=${4:-3}
bench=${bins[0]}
work=$(mktemp -d)
node_pid=
cleanup() {
    if [ -n "$node_pid" ]; then kill "$node_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

case $mode in
small) python3 scripts/make_onnx_models.py "$work/models" >/dev/null
    cat >"$work/config.toml" <<EOF
[[models]]
name = "tiny-onnx"
engine = "onnx"
path = "$work/models/tiny_mlp.onnx"
replicas = 2
[models.options]
intra_op_threads = 1
EOF
    ;;
big) python3 scripts/make_onnx_models.py "$work/models" --big >/dev/null
    cat >"$work/config.toml" <<EOF
[[models]]
name = "big-onnx"
engine = "onnx"
path = "$work/models/big_mlp.onnx"
replicas = 1
[models.batching]
max_batch_size = 32
max_queue_delay_us = 4000
[models.options]
intra_op_threads = 2
EOF
    ;;
*) echo "mode must be small or big" >&2; exit 2 ;;
esac

# Sum of user+system clock ticks of the node's threads whose name starts with $1.
ticks() {
    local sum=0 t
    for t in /proc/"$node_pid"/task/*; do
        if [[ $(cat "$t/comm") == "$1"* ]]; then
            sum=$((sum + $(awk '{print $14 + $15}' "$t/stat")))
        fi
    done
    echo "$sum"
}

requests() {
    curl -s "http://$addr/metrics" |
        awk -v m="$1" '$1 ~ "^cohort_requests_total\\{" && $1 ~ "model=\"" m "\"" && $1 ~ "status=\"200\"" {s += $2} END {print s + 0}'
}

run() {
    local label=$1 bin=$2 port
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    addr=127.0.0.1:$port
    "$bin" up --http-addr "$addr" --data-dir "$work/data-$label" --config "$work/config.toml" \
        >"$work/node.log" 2>&1 &
    node_pid=$!
    local deadline=$((SECONDS + 30))
    until curl -sf "http://$addr/readyz" >/dev/null; do
        if ((SECONDS > deadline)) || ! kill -0 "$node_pid" 2>/dev/null; then
            echo "$label: the node did not become ready" >&2
            cat "$work/node.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    sleep 3
    local rss
    rss=$(awk '/^VmRSS/ {print $2 / 1024 " MB"}' /proc/"$node_pid"/status)
    case $mode in
    small)
        for model in tiny-onnx mlp; do
            "$bench" bench --url "http://$addr" --model "$model" --concurrency 16 --duration 5s --json |
                python3 -c "import json, sys; d = json.load(sys.stdin)
print('$label', '$model', 'req/s', round(d['requests_per_second']), 'p50_us', d['latency_us']['p50'], 'p99_us', d['latency_us']['p99'], 'idle_rss', '$rss')"
        done
        ;;
    big)
        local w0 r0 out
        "$bench" bench --url "http://$addr" --model big-onnx --concurrency 64 --duration 3s \
            --protocol kserve-binary --json >/dev/null
        w0=$(ticks cohort-worker)
        r0=$(requests big-onnx)
        out=$("$bench" bench --url "http://$addr" --model big-onnx --concurrency 64 --duration 16s \
            --protocol kserve-binary --raw-onnx "$work/models/big_mlp.onnx" --raw-threads 2 --json)
        # The raw rounds leave the node idle, so its workers' ticks count only HTTP requests.
        local us_per_req
        us_per_req=$(python3 -c "print(round(($(ticks cohort-worker) - $w0) * 1e6 / $(getconf CLK_TCK) / max(1, $(requests big-onnx) - $r0), 1))")
        echo "$out" | python3 -c "import json, sys; d = json.load(sys.stdin)
print('$label', 'samples/s', round(d['samples_per_second']), 'raw', round(d['raw_onnx']['samples_per_second']), 'vs_raw', d['vs_raw'], 'worker_us_per_req', $us_per_req, 'idle_rss', '$rss')"
        ;;
    esac
    kill "$node_pid"
    wait "$node_pid" 2>/dev/null || true
    node_pid=
}

for ((r = 1; r <= rounds; r++)); do
    run A "${bins[0]}"
    run B "${bins[1]}"
done
