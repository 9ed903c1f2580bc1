#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ with libFuzzer's coverage instrumentation on the stable toolchain (the
# same code-generation flags cargo-fuzz passes, without a sanitizer, which needs nightly) and runs each for
# a bounded time. A crash fails the script and leaves the input under target/fuzz/artifacts/TARGET/.
#
#   bash ci/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 15 seconds, every target
#
# Longer runs: `bash ci/fuzz.sh 3600 begin`, or with cargo-fuzz and nightly (adds AddressSanitizer):
# `cd fuzz && cargo +nightly fuzz run begin`. See docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
secs=${1:-15}
shift || true

host=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="$root/target/fuzz"
# --target keeps these flags off build scripts and proc macros, as cargo-fuzz does.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth \
-Cdebug-assertions -Coverflow-checks"
cargo build --release --locked --manifest-path fuzz/Cargo.toml --target "$host" --bins

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cd fuzz/fuzz_targets && ls ./*.rs | sed 's|^\./||; s|\.rs$||')
fi
for t in "${targets[@]}"; do
  corpus="$CARGO_TARGET_DIR/corpus/$t"
  artifacts="$CARGO_TARGET_DIR/artifacts/$t/"
  mkdir -p "$corpus" "$artifacts"
  if [ -d "fuzz/seeds/$t" ]; then cp -n "fuzz/seeds/$t"/* "$corpus"/ 2>/dev/null || true; fi
  printf '%-22s ' "$t"
  log="$CARGO_TARGET_DIR/$t.log"
  if ! "$CARGO_TARGET_DIR/$host/release/$t" -max_total_time="$secs" -rss_limit_mb=2048 \
      -artifact_prefix="$artifacts" -print_final_stats=1 "$corpus" >"$log" 2>&1 </dev/null; then
    echo "FAILED"
    tail -n 40 "$log" >&2
    echo "fuzz target $t failed; input saved under $artifacts" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1)
  echo "ok: $runs inputs, $cov, corpus $(ls "$corpus" | wc -l)"
done
