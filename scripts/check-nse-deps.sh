#!/usr/bin/env bash
# Fails if the notification-extension crates (kalandra-nse and its bindings,
# kalandra-nse-ffi) depend, directly or not, on an MLS library, an async
# runtime or network code: an iOS Notification Service Extension runs with
# about 20 MB and must not carry them. Run from the repository root (CI:
# .ci/run). Arguments check other packages instead
# (`bash scripts/check-nse-deps.sh client-core` fails, which shows the check
# works).
set -euo pipefail
cd "$(dirname "$0")/.."

forbidden='^(openmls.*|tokio.*|quinn.*|rustls.*|hyper.*|mio|socket2|async-nats|redb|hpke-rs.*)$'
if [ "$#" -eq 0 ]; then set -- kalandra-nse kalandra-nse-ffi; fi
for package in "$@"; do
    names=$(cargo tree -p "$package" --edges normal,build --prefix none --format '{p}' --locked \
        | awk '{print $1}' | sort -u)
    found=$(printf '%s\n' "$names" | grep -E "$forbidden" || true)
    if [ -n "$found" ]; then
        echo "$package must not depend on: $(echo $found)" >&2
        exit 1
    fi
    echo "$package: $(printf '%s\n' "$names" | wc -l) crates in its tree, no MLS, async runtime or network crate"
done
