#!/usr/bin/env bash
# Runs one cargo-fuzz target for a fixed time and prints libFuzzer's final stats.
#
#   bash fuzz/run.sh <target> <seconds> [extra libFuzzer flags...]
#
# Targets: frame_decoder, payload_decode (see fuzz/README.md).
# The toolchain here is stable; cargo-fuzz passes nightly-only flags
# (-Zsanitizer=address, -Cpasses=sancov-module, ...), which a stable rustc
# accepts with RUSTC_BOOTSTRAP=1.
#
# Environment:
#   CARGO_TARGET_DIR  build directory (default: fuzz/target)
#   FUZZ_SANITIZER    address (default), none, ...: passed to `cargo fuzz run -s`
#
# Inputs libFuzzer finds go to fuzz/corpus-gen/<target>/ (git-ignored); the
# committed seeds in fuzz/corpus/<target>/ are only read. Crashes go to
# fuzz/artifacts/<target>/, the full log to fuzz/logs/.
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: bash fuzz/run.sh <target> <seconds> [libFuzzer flags...]" >&2
    exit 2
fi
target=$1
seconds=$2
shift 2

fuzz_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$fuzz_dir")
cd "$repo_dir"

if ! grep -q "^name = \"$target\"$" "$fuzz_dir/Cargo.toml"; then
    echo "unknown fuzz target '$target'; known:" $(sed -n 's/^name = "\(.*\)"$/\1/p' "$fuzz_dir/Cargo.toml" | grep -v kalandra) >&2
    exit 2
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz not found; installing it from crates.io" >&2
    cargo install cargo-fuzz --locked
fi

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$fuzz_dir/target}
export RUSTC_BOOTSTRAP=1
sanitizer=${FUZZ_SANITIZER:-address}

work_corpus=$fuzz_dir/corpus-gen/$target
seed_corpus=$fuzz_dir/corpus/$target
mkdir -p "$work_corpus" "$seed_corpus" "$fuzz_dir/artifacts/$target" "$fuzz_dir/logs"

libfuzzer_flags=(
    "-max_total_time=$seconds"
    -print_final_stats=1
)
# One fuzzing process, in-process: no -jobs/-workers/-fork. (-jobs=1 would
# run the same single fuzzer in a child process that logs to ./fuzz-0.log.)
# cargo fuzz itself sets -artifact_prefix=fuzz/artifacts/<target>/.
if [ -f "$fuzz_dir/dict/$target.dict" ]; then
    libfuzzer_flags+=("-dict=$fuzz_dir/dict/$target.dict")
fi

log=$fuzz_dir/logs/$target-$(date -u +%Y%m%dT%H%M%SZ).log
echo "fuzzing $target for ${seconds}s (sanitizer: $sanitizer, target dir: $CARGO_TARGET_DIR); log: $log"
set +e
cargo fuzz run -s "$sanitizer" "$target" "$work_corpus" "$seed_corpus" -- \
    "${libfuzzer_flags[@]}" "$@" >"$log" 2>&1
status=$?
set -e

# The last coverage line, then libFuzzer's final stats (or the crash report).
grep -E '^#[0-9]+' "$log" | tail -n 1 || true
if grep -q '^stat::' "$log"; then
    grep '^stat::' "$log"
fi
if [ $status -ne 0 ]; then
    echo "--- libFuzzer exited with status $status; end of log:" >&2
    tail -n 40 "$log" >&2
fi
exit $status
