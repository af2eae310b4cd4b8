#!/usr/bin/env bash
# The many-core measurements of docs/benchmarks.md (issues 13 and 16), in one go on a server:
# builds moe_benchmarks natively with every core, then runs, as Google Benchmark JSON into OUTDIR,
#   scaling.json  fp32 prefill (512 tokens), Eigen and packed experts, 1..N threads;
#   prefill.json  fp32 / packed at 64, 512, 2048 tokens on 2 threads, and peak/gemm;
#   decode.json   every dtype at 1 and 8 tokens on 2 threads, and peak/read;
#   decode_8x7b.json  the Mixtral-8x7B layer, same dtypes (only with MOE_BENCH_8X7B=1: its weights
#                 take a while to generate per dtype).
#   benchmarks/run_scaling.sh OUTDIR [THREADS, default 1,2,4,8,16]
# Benchmark names end in /min_time:.../real_time: filters anchor on "/", never on "$".
set -euo pipefail
out="${1:?usage: run_scaling.sh OUTDIR [THREADS]}"
threads="${2:-1,2,4,8,16}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$root/build-scaling"
mkdir -p "$out"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOE_BUILD_BENCHMARKS=ON \
  -DMOE_BUILD_TESTS=OFF -DMOE_BUILD_EXAMPLES=OFF -DMOE_INSTALL=OFF > "$out/configure.log"
cmake --build "$build" --target moe_benchmarks -j "$(nproc)" > "$out/build.log"
bench="$build/benchmarks/moe_benchmarks"
common=(--benchmark_repetitions=3 --benchmark_report_aggregates_only=true
        --benchmark_out_format=json)
lscpu > "$out/lscpu.txt"
MOE_BENCH_THREADS="$threads" "$bench" "${common[@]}" --benchmark_out="$out/scaling.json" \
  --benchmark_filter='^(sparse/(mixtral_quarter|olmoe|qwen3)/dtype:fp32(_packed)?/tokens:512/|peak/gemm/)'
"$bench" "${common[@]}" --benchmark_out="$out/prefill.json" \
  --benchmark_filter='^sparse/(mixtral_quarter|olmoe|qwen3)/dtype:fp32(_packed)?/tokens:(64|512|2048)/threads:2/'
"$bench" "${common[@]}" --benchmark_out="$out/decode.json" \
  --benchmark_filter='^(sparse/(mixtral_quarter|olmoe|qwen3)/dtype:(fp32|bf16|int8|fp8|q8|q4|mxfp4)/tokens:(1|8|512)/threads:2/|peak/read/streams:4/threads:2/)'
if [[ "${MOE_BENCH_8X7B:-0}" == 1 ]]; then
  "$bench" "${common[@]}" --benchmark_out="$out/decode_8x7b.json" \
    --benchmark_filter='^sparse/mixtral_8x7b/dtype:(fp32|bf16|int8|q8|q4|mxfp4)/tokens:(1|8)/threads:2/'
fi
