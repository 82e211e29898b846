#!/usr/bin/env bash
# hami-rs GPU validation suite: runs real CUDA work under libvgpu.so on a
# GPU machine and prints one table.
#
#   bench/gpu/run.sh                 # build the library, run everything
#   HAMI_VGPU_LIB=/path/libvgpu.so bench/gpu/run.sh   # use a prebuilt one
#
# Checks: memory limit enforced (an allocation 1 MiB over the limit fails,
# one under it succeeds), the container view (cuMemGetInfo, nvidia-smi,
# torch.cuda.mem_get_info when PyTorch is installed), compute quota accuracy
# at 10/30/50/70 % for a steady kernel stream, and overhead against no
# interposer on a launch-heavy loop and (with PyTorch) a large matmul.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "SKIPPED: no NVIDIA GPU here (nvidia-smi missing or failing)"
  exit 0
fi

lib="${HAMI_VGPU_LIB:-}"
if [ -z "$lib" ]; then
  if command -v cargo >/dev/null; then
    lib="$("$here/build-lib.sh")" || { echo "build failed"; exit 1; }
  else
    for c in "$root/target/zigbuild/x86_64-unknown-linux-gnu/release/libvgpu.so" "$root/target/release/libvgpu.so"; do
      [ -f "$c" ] && lib="$c" && break
    done
  fi
fi
[ -f "$lib" ] || { echo "no libvgpu.so (set HAMI_VGPU_LIB or install cargo)"; exit 1; }

cc -O2 -o "$work/gpuprobe" "$here/gpuprobe.c" -ldl || { echo "cannot compile gpuprobe.c"; exit 1; }
probe="$work/gpuprobe"
have_torch=0
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null && have_torch=1

rows=()
row() { rows+=("$1|$2|$3|$4"); }
n=0
# Runs "$@" under the interposer with a fresh shared region; extra env first.
under() {
  n=$((n + 1))
  env CUDA_DEVICE_MEMORY_SHARED_CACHE="$work/r$n.cache" HAMI_LIMITS_FILE="$work/none" \
    LD_PRELOAD="$lib" "$@"
}
near() { awk -v a="$1" -v b="$2" -v t="$3" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= t) }'; }
field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p"; }

limit=$((1 << 30))
# 1. Memory limit and the driver-API view.
out=$(under env CUDA_DEVICE_MEMORY_LIMIT=1g "$probe" mem $limit 2>&1)
total=$(echo "$out" | field total); over=$(echo "$out" | field over_1MiB); under_rc=$(echo "$out" | field under)
[ "$total" = "$limit" ] && r=PASS || r=FAIL
row "cuMemGetInfo total under a 1 GiB limit" "$limit" "${total:-error: $out}" $r
[ "$over" = "2" ] && r=PASS || r=FAIL
row "allocation 1 MiB over the limit" "CUDA_ERROR_OUT_OF_MEMORY (2)" "${over:-?}" $r
[ "$under_rc" = "0" ] && r=PASS || r=FAIL
row "allocation within the limit" "0" "${under_rc:-?}" $r

# 2. nvidia-smi in the interposed environment.
smi=$(under env CUDA_DEVICE_MEMORY_LIMIT=1g nvidia-smi -i 0 --query-gpu=memory.total --format=csv,noheader,nounits 2>&1 | head -1 | tr -d ' ')
[ "$smi" = "1024" ] && r=PASS || r=FAIL
row "nvidia-smi memory.total (MiB)" "1024" "$smi" $r

# 3. PyTorch's view.
if [ $have_torch = 1 ]; then
  t=$(under env CUDA_DEVICE_MEMORY_LIMIT=1g python3 -c 'import torch; print(torch.cuda.mem_get_info()[1])' 2>&1 | tail -1)
  [ "$t" = "$limit" ] && r=PASS || r=FAIL
  row "torch.cuda.mem_get_info total" "$limit" "$t" $r
  oom=$(under env CUDA_DEVICE_MEMORY_LIMIT=1g python3 -c '
import torch
try:
    torch.empty(1100 << 20, dtype=torch.uint8, device="cuda"); print("allocated")
except torch.OutOfMemoryError:
    print("OutOfMemoryError")' 2>&1 | tail -1)
  [ "$oom" = "OutOfMemoryError" ] && r=PASS || r=FAIL
  row "torch.empty(1100 MiB) under 1 GiB" "OutOfMemoryError" "$oom" $r
else
  row "torch.cuda.mem_get_info total" "$limit" "unmeasured (no PyTorch)" SKIP
fi

# 4. Compute quota accuracy.
for q in 10 30 50 70; do
  s=$(under env CUDA_DEVICE_SM_LIMIT=$q "$probe" quota 5 1000 2>&1 | field share)
  near "${s:-999}" $q 5 && r=PASS || r=FAIL
  row "compute share at quota $q% (1 ms kernels, 5 s)" "$q +/- 5" "${s:-error}" $r
done
s=$("$probe" quota 3 1000 2>&1 | field share)
row "compute share without interposer" "~100" "${s:-error}" INFO

# 5. Overhead.
base=$("$probe" launch 200000 | field ns_per_launch)
with=$(under "$probe" launch 200000 | field ns_per_launch)
added=$(awk -v a="$with" -v b="$base" 'BEGIN { printf "%.1f", a - b }')
row "cuLaunchKernel ns/launch: none -> interposed" "added < 100 ns" "$base -> $with (+$added)" INFO
if [ $have_torch = 1 ]; then
  mm='import torch, time
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(5): a @ b
torch.cuda.synchronize(); t = time.time()
for _ in range(50): a @ b
torch.cuda.synchronize(); print("%.2f" % ((time.time() - t) * 1000 / 50))'
  m0=$(python3 -c "$mm" 2>&1 | tail -1)
  m1=$(under python3 -c "$mm" 2>&1 | tail -1)
  row "8192^2 bf16 matmul ms: none -> interposed" "within noise" "$m0 -> $m1" INFO
else
  row "8192^2 bf16 matmul" "within noise" "unmeasured (no PyTorch)" SKIP
fi

echo
echo "hami-rs GPU validation on: $(nvidia-smi -i 0 --query-gpu=name,driver_version --format=csv,noheader)"
printf '%-48s | %-28s | %-32s | %s\n' check expected measured result
printf '%s\n' "$(printf '%.0s-' {1..120})"
for r in "${rows[@]}"; do
  IFS='|' read -r a b c d <<<"$r"
  printf '%-48s | %-28s | %-32s | %s\n' "$a" "$b" "$c" "$d"
done
printf '%s\n' "${rows[@]}" | grep -q '|FAIL$' && exit 1 || exit 0
