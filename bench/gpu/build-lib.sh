#!/usr/bin/env bash
# Builds libvgpu.so so that it loads on glibc 2.17 or newer (any CUDA
# container base image), with cargo-zigbuild from PyPI, and checks the
# symbol versions it needs. Prints the path of the library.
#
#   bench/gpu/build-lib.sh            # -> target/zigbuild/.../libvgpu.so
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
if ! command -v cargo-zigbuild >/dev/null; then
  pip install --quiet ziglang cargo-zigbuild >&2
fi
target=x86_64-unknown-linux-gnu
CARGO_TARGET_DIR="$root/target/zigbuild" cargo zigbuild -j"${JOBS:-2}" --release \
  --target "$target.2.17" -p hami-core >&2
lib="$root/target/zigbuild/$target/release/libvgpu.so"
newest=$(objdump -T "$lib" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
echo "libvgpu.so needs at most $newest" >&2
case "$newest" in
  GLIBC_2.1[0-7]|GLIBC_2.[0-9]|GLIBC_2.[0-9].*|GLIBC_2.1[0-7].*) ;;
  *) echo "error: $lib needs $newest (> GLIBC_2.17)" >&2; exit 1 ;;
esac
echo "$lib"
