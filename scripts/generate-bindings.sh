#!/usr/bin/env bash
# Generates the Kotlin, Swift and Python bindings of kalandra-ffi (the app's
# device, module `kalandra`) and of kalandra-nse-ffi (the notification
# extension's push decryption, module `kalandra_nse`) from their debug
# cdylibs with kalandra-ffi's uniffi-bindgen (same uniffi version as the
# libraries), into OUT_DIR (default crates/kalandra-ffi/bindings, which is
# committed; scripts/test-bindings.sh regenerates and compares).
#   bash scripts/generate-bindings.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-crates/kalandra-ffi/bindings}"
target="${CARGO_TARGET_DIR:-target}"

cargo build -p kalandra-ffi --lib --bin uniffi-bindgen --locked
cargo build -p kalandra-nse-ffi --lib --locked
case "$(uname -s)" in
    Darwin) suffix=dylib ;;
    *) suffix=so ;;
esac
for language in kotlin swift python; do
    rm -rf "${out:?}/$language"
    for library in kalandra_ffi kalandra_nse_ffi; do
        "$target/debug/uniffi-bindgen" generate --library "$target/debug/lib$library.$suffix" \
            --language "$language" --no-format --out-dir "$out/$language"
    done
done
