#!/usr/bin/env bash
# The checkpoint measurements of docs/io.md (issue 14), in one go on a Linux server: builds
# mixtral_forward (and the memory-limit unit test), writes the synthetic Mixtral-8x7B-shaped
# checkpoint (2 layers, bf16, 6.3 GB), then into OUTDIR:
#   tiny_<weights>.txt        tests/data/mixtral_tiny loaded fp32 / as-stored / bf16 / q8 / q4;
#   synth_<weights>.txt       the synthetic checkpoint, 1 token, 2 threads, warm page cache
#                             (weights: $MOE_SYNTH_WEIGHTS, default "as-stored fp32 q8 q4");
#   synth_cold.txt            as-stored after evicting the shards from the page cache
#                             (posix_fadvise DONTNEED: no root needed): time and bytes read;
#   synth_limit_<MiB>.txt     as-stored, 64 tokens (every expert chosen), in a cgroup v2 group
#                             whose memory.max is below the expert bytes; synth_nolimit.txt the
#                             same run without the limit (their top-5 lines must be equal);
#   cgroup_test.txt           the unit test IoStoredMemory.* (skips where no cgroup can be made).
#   benchmarks/run_checkpoint.sh OUTDIR [SYNTH_DIR, default /tmp/moe_synth]
set -uo pipefail
out="${1:?usage: run_checkpoint.sh OUTDIR [SYNTH_DIR]}"
synth="${2:-/tmp/moe_synth}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$root/build-checkpoint"
mkdir -p "$out"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOE_UNIT_TESTS=io_stored_model_test \
  > "$out/configure.log" || exit 1
cmake --build "$build" --target mixtral_forward moe_unit_tests -j "$(nproc)" > "$out/build.log" \
  || exit 1
fwd="$build/examples/mixtral_forward"

"$build/tests/moe_unit_tests" --gtest_filter='IoStoredMemory.*' > "$out/cgroup_test.txt" 2>&1

for w in fp32 as-stored bf16 q8 q4; do
  "$fwd" --checkpoint "$root/tests/data/mixtral_tiny" --weights "$w" --tokens 1,42,7 --threads 2 \
    --repeats 20 > "$out/tiny_$w.txt" 2>&1
done

[[ -d "$synth" ]] || python3 "$root/examples/make_synthetic_mixtral.py" --out "$synth" --layers 2 \
  > "$out/synth_gen.log"
timer=(); [[ -x /usr/bin/time ]] && timer=(/usr/bin/time -v)
run_synth() {  # NAME ARGS...: one mixtral_forward run on the synthetic checkpoint (<= 5 min)
  local name="$1"; shift
  timeout 300 "${timer[@]}" "$fwd" --checkpoint "$synth" --threads 2 "$@" > "$out/$name.txt" 2>&1
}
for w in ${MOE_SYNTH_WEIGHTS:-as-stored fp32 q8 q4}; do
  run_synth "synth_$w" --weights "$w" --tokens 1 --repeats 5
done

evict() {  # drops the shards' pages from the page cache
  python3 - "$synth" <<'PY'
import os, sys
for name in os.listdir(sys.argv[1]):
    fd = os.open(os.path.join(sys.argv[1], name), os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
PY
}
evict
run_synth synth_cold --weights as-stored --tokens 1 --repeats 1

# Larger than the memory: a cgroup v2 group (child of our own group, else of the root).
tokens64=$(seq -s, 1 64)
run_synth synth_nolimit --weights as-stored --tokens "$tokens64" --repeats 1
own="/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)"
for parent in "$own" /sys/fs/cgroup; do
  grep -qw memory "$parent/cgroup.subtree_control" 2>/dev/null ||
    echo +memory > "$parent/cgroup.subtree_control" 2>/dev/null || continue
  group="$parent/moe_checkpoint_limit"
  mkdir -p "$group" 2>/dev/null || continue
  for mib in 3072 2048; do
    echo $((mib * 1024 * 1024)) > "$group/memory.max" || continue
    echo 0 > "$group/memory.swap.max" 2>/dev/null
    evict
    ( echo $BASHPID > "$group/cgroup.procs" && run_synth "synth_limit_$mib" --weights as-stored \
        --tokens "$tokens64" --repeats 1 )
    cat "$group/memory.events" > "$out/synth_limit_${mib}_events.txt" 2>/dev/null
  done
  rmdir "$group" 2>/dev/null
  break
done
echo "cgroup parent tried: $own; files: $(ls "$out" | tr '\n' ' ')" > "$out/done.txt"
