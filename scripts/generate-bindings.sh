#!/usr/bin/env bash
# Generates the Kotlin, Swift and Python bindings of kalandra-ffi from its
# debug cdylib with the crate's own uniffi-bindgen (same uniffi version as
# the library), into OUT_DIR (default crates/kalandra-ffi/bindings, which is
# committed; scripts/test-bindings.sh regenerates and compares).
#   bash scripts/generate-bindings.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-crates/kalandra-ffi/bindings}"
target="${CARGO_TARGET_DIR:-target}"

cargo build -p kalandra-ffi --lib --bin uniffi-bindgen --locked
case "$(uname -s)" in
    Darwin) library="$target/debug/libkalandra_ffi.dylib" ;;
    *) library="$target/debug/libkalandra_ffi.so" ;;
esac
for language in kotlin swift python; do
    rm -rf "${out:?}/$language"
    "$target/debug/uniffi-bindgen" generate --library "$library" --language "$language" \
        --no-format --out-dir "$out/$language"
done
