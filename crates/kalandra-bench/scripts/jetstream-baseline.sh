#!/usr/bin/env bash
# Runs the throughput scenario against kalandra-server and, in the same
# run, against NATS JetStream (one replica, file storage) on loopback, and
# prints the ratio. Installs nats-server (Debian package) if missing,
# starts it with its own temporary store, and stops it by pid at the end.
#
# Usage: crates/kalandra-bench/scripts/jetstream-baseline.sh [throughput flags...]
# Environment: CARGO_TARGET_DIR (default: target), NATS_PORT (default: 14222).
set -euo pipefail

repo="$(cd "$(dirname "$0")/../../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
port="${NATS_PORT:-14222}"

if ! command -v nats-server >/dev/null 2>&1; then
    apt-get install -y nats-server >/dev/null || { apt-get update -qq && apt-get install -y nats-server >/dev/null; }
fi
(cd "$repo" && cargo build --release -p kalandra-server -p kalandra-bench >&2)

store="$(mktemp -d -t kalandra-bench-nats-XXXXXX)"
nats-server -a 127.0.0.1 -p "$port" -js -sd "$store" >"$store/nats.log" 2>&1 &
nats_pid=$!
cleanup() {
    kill "$nats_pid" 2>/dev/null || true
    wait "$nats_pid" 2>/dev/null || true
    rm -rf "$store"
}
trap cleanup EXIT

# Wait (bounded) for the port.
for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    sleep 0.1
done

"$target/release/kalandra-bench" throughput \
    --jetstream "nats://127.0.0.1:$port" --jetstream-pid "$nats_pid" "$@"
