#!/usr/bin/env bash
# Builds the benchmark suite (Release, -march=native) if needed and runs it.
#
#   benchmarks/run.sh [--filter REGEX] [--out FILE.json] [--repetitions N] [--build-dir DIR]
#
# Writes Google Benchmark JSON with the median of N repetitions (default 3) of every benchmark
# (aggregates only), then prints the summary. Turn the JSON into docs/benchmarks.md and
# docs/benchmarks.png with benchmarks/report FILE.json. Build parallelism: MOE_BUILD_JOBS
# (default 1: the reference machine is shared).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
filter=""
out="$root/build-release/benchmarks.json"
reps=3
build_dir="$root/build-release"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --filter) filter="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --repetitions) reps="$2"; shift 2 ;;
    --build-dir) build_dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if [[ ! -f "$build_dir/CMakeCache.txt" ]]; then
  cmake -S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DMOE_BUILD_BENCHMARKS=ON \
    -DMOE_BUILD_TESTS=OFF -DMOE_BUILD_EXAMPLES=OFF -DMOE_INSTALL=OFF
fi
cmake --build "$build_dir" --target moe_benchmarks -j "${MOE_BUILD_JOBS:-1}"

mkdir -p "$(dirname "$out")"
args=(--benchmark_repetitions="$reps" --benchmark_report_aggregates_only=true
      --benchmark_out="$out" --benchmark_out_format=json)
[[ -n "$filter" ]] && args+=(--benchmark_filter="$filter")
"$build_dir/benchmarks/moe_benchmarks" "${args[@]}"
echo "run.sh: wrote $out (medians: run_name + aggregate_name == median)"
