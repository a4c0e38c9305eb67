#!/usr/bin/env bash
# The bindings, checked and run (CI: .ci/run, after the Rust tests):
# 1. regenerates the Kotlin, Swift and Python bindings from the debug
#    library and fails if they differ from the committed ones in
#    crates/kalandra-ffi/bindings (run scripts/generate-bindings.sh and
#    commit to update them);
# 2. runs the Python test (pytest, installed with pip if missing) against a
#    real kalandra-server process on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cargo build -p kalandra-server --bin kalandra-server --locked
bash scripts/generate-bindings.sh "$work/bindings"
if ! diff -ru crates/kalandra-ffi/bindings "$work/bindings"; then
    echo "the committed bindings are stale: run scripts/generate-bindings.sh and commit" >&2
    exit 1
fi

if ! python3 -c 'import pytest' >/dev/null 2>&1; then
    python3 -m pip install --quiet 'pytest>=7,<9'
fi
module="$work/bindings/python"
case "$(uname -s)" in
    Darwin) cp "$target/debug/libkalandra_ffi.dylib" "$target/debug/libkalandra_nse_ffi.dylib" "$module/" ;;
    *) cp "$target/debug/libkalandra_ffi.so" "$target/debug/libkalandra_nse_ffi.so" "$module/" ;;
esac
status=0
KALANDRA_BINDINGS_DIR="$module" KALANDRA_SERVER_BIN="$target/debug/kalandra-server" \
    python3 -m pytest -q -p no:cacheprovider crates/kalandra-ffi/tests/python || status=$?
# pytest: 0 all passed, 5 no test collected (a failure here too), others failed.
if [ "$status" -ne 0 ]; then
    echo "Python binding tests failed (pytest exit code $status)" >&2
    exit 1
fi
