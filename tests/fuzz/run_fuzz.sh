#!/bin/sh
# Builds the libFuzzer targets in build-fuzz/ (clang, ASan + UBSan) and runs them on one core:
#   tests/fuzz/run_fuzz.sh [seconds]   safetensors and gguf targets for `seconds` each (default
#                                      60), then the index and config.json targets for a quarter
#                                      of that each (at least 5).
# New corpus entries go to build-fuzz/tests/fuzz/corpus/, crashes to build-fuzz/tests/fuzz/artifacts/.
set -eu
seconds=${1:-60}
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$root/build-fuzz
fuzz=$build/tests/fuzz

cmake -S "$root" -B "$build" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=Debug \
  -DMOE_BUILD_FUZZERS=ON -DMOE_BUILD_EXAMPLES=OFF -DMOE_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build "$build" -j1 --target safetensors_fuzz index_fuzz config_fuzz gguf_fuzz

run() {  # kind seconds [dict]
  mkdir -p "$fuzz/corpus/$1" "$fuzz/artifacts"
  UBSAN_OPTIONS=print_stacktrace=1 "$fuzz/$1_fuzz" -max_total_time="$2" -timeout=10 \
    -print_final_stats=1 -dict="$root/tests/fuzz/${3:-safetensors}.dict" \
    -artifact_prefix="$fuzz/artifacts/" "$fuzz/corpus/$1" "$root/tests/fuzz/corpus/$1"
}
run safetensors "$seconds"
run gguf "$seconds" gguf
index_seconds=$((seconds / 4))
[ "$index_seconds" -ge 5 ] || index_seconds=5
run index "$index_seconds"
run config "$index_seconds"
