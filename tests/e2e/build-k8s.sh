#!/usr/bin/env bash
# Build (once) the real Kubernetes binaries the e2e tests run against:
# kube-apiserver, kube-scheduler, kube-controller-manager, etcd and kwok
# for the control plane, and
# kubelet, containerd, its runc shim and ctr for the real node, from the
# pinned Go wrapper modules under tests/e2e/k8s-build/. See tests/e2e/README.md.
#
#   BIN=$(tests/e2e/build-k8s.sh | tail -1)   # build what is missing, print dir
#   tests/e2e/build-k8s.sh --check            # exit 0 iff all cached and runnable
#   tests/e2e/build-k8s.sh --dir              # print the cache dir, build nothing
#
# Only the final directory goes to stdout; everything else goes to stderr.
#
# Environment:
#   HAMI_K8S_BIN_DIR   cache root (default: $HOME/.cache/hami-rs/k8s-bin)
#   HAMI_K8S_BUILD_P   value for `go build -p` (default: Go's own default)
set -euo pipefail

# Pinned versions. They must match the wrapper go.mod files (checked below).
K8S_VERSION=v1.34.2
K8S_BUILD_DATE=2025-11-11T19:00:37Z # publication time of k8s.io/kubernetes@v1.34.2
ETCD_VERSION=v3.6.5
KWOK_VERSION=v0.7.0
CONTAINERD_VERSION=v2.4.2

BINARIES=(kube-apiserver kube-scheduler kube-controller-manager etcd kwok kubelet containerd containerd-shim-runc-v2 ctr)

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MOD_ROOT="$SCRIPT_DIR/k8s-build"
KEY="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_containerd-${CONTAINERD_VERSION}"
CACHE_ROOT="${HAMI_K8S_BIN_DIR:-$HOME/.cache/hami-rs/k8s-bin}"
OUT_DIR="$CACHE_ROOT/$KEY"

log() { printf 'build-k8s: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

# Text that `<binary> --version` must print for the binary to count as good.
expected_version() {
  case "$1" in
    kube-apiserver | kube-scheduler | kube-controller-manager | kubelet) echo "Kubernetes ${K8S_VERSION}" ;;
    containerd | containerd-shim-runc-v2 | ctr) echo "${CONTAINERD_VERSION}" ;;
    etcd) echo "etcd Version: ${ETCD_VERSION#v}" ;;
    kwok) echo "${KWOK_VERSION#v}" ;;
    *) die "unknown binary $1" ;;
  esac
}

# version_ok <path> <name>: the binary runs and reports the pinned version.
version_ok() {
  local out flag=--version
  # The shim parses Go's flag package: one dash.
  [[ "$2" == containerd-shim-runc-v2 ]] && flag=-v
  out=$("$1" "$flag" 2>&1) || return 1
  [[ "$out" == *"$(expected_version "$2")"* ]]
}

all_present() {
  local b
  for b in "${BINARIES[@]}"; do
    [[ -x "$OUT_DIR/$b" ]] || return 1
  done
}

check() {
  local b ok=0
  for b in "${BINARIES[@]}"; do
    if [[ ! -x "$OUT_DIR/$b" ]]; then
      log "missing: $OUT_DIR/$b"
      ok=1
    elif ! version_ok "$OUT_DIR/$b" "$b"; then
      log "broken: $OUT_DIR/$b --version failed or reports the wrong version"
      ok=1
    else
      log "ok: $b"
    fi
  done
  if [[ $ok -eq 0 ]]; then
    echo "$OUT_DIR"
  fi
  return $ok
}

case "${1:-}" in
  "") ;;
  --check) check; exit $? ;;
  --dir) echo "$OUT_DIR"; exit 0 ;;
  -h | --help) usage; exit 0 ;;
  *) usage; die "unknown argument: $1" ;;
esac

# Fast path: a cache hit runs no Go at all.
if all_present; then
  echo "$OUT_DIR"
  exit 0
fi

command -v go >/dev/null || die "go is not on PATH (Go >= 1.24 is needed to build the control plane)"

# The wrapper modules must pin the same versions the cache key names.
grep -qE "^require k8s\.io/kubernetes ${K8S_VERSION}\$" "$MOD_ROOT/kubernetes/go.mod" ||
  die "$MOD_ROOT/kubernetes/go.mod does not require k8s.io/kubernetes ${K8S_VERSION}"
if grep -E '^\s*k8s\.io/[a-z-]+ => ' "$MOD_ROOT/kubernetes/go.mod" | grep -vqE "=> k8s\.io/[a-z-]+ v0\.${K8S_VERSION#v1.}\$"; then
  die "$MOD_ROOT/kubernetes/go.mod has a staging replace that is not v0.${K8S_VERSION#v1.}"
fi
grep -qE "^require go\.etcd\.io/etcd/server/v3 ${ETCD_VERSION}\$" "$MOD_ROOT/etcd/go.mod" ||
  die "$MOD_ROOT/etcd/go.mod does not require go.etcd.io/etcd/server/v3 ${ETCD_VERSION}"
grep -qE "^require sigs\.k8s\.io/kwok ${KWOK_VERSION}\$" "$MOD_ROOT/kwok/go.mod" ||
  die "$MOD_ROOT/kwok/go.mod does not require sigs.k8s.io/kwok ${KWOK_VERSION}"
grep -qE "^require github\.com/containerd/containerd/v2 ${CONTAINERD_VERSION}\$" "$MOD_ROOT/containerd/go.mod" ||
  die "$MOD_ROOT/containerd/go.mod does not require github.com/containerd/containerd/v2 ${CONTAINERD_VERSION}"

mkdir -p "$OUT_DIR"

# One builder at a time per cache dir; a second caller waits, then finds the
# binaries the first one built.
if command -v flock >/dev/null; then
  exec 9>"$OUT_DIR/.lock"
  if ! flock -n 9; then
    log "another build-k8s.sh is building into $OUT_DIR; waiting for it"
    flock 9
  fi
fi

# Leftovers of an interrupted build (we hold the lock, so nobody uses them).
rm -rf "$OUT_DIR"/.tmp.* 2>/dev/null || true

TMP_DIR=$(mktemp -d "$OUT_DIR/.tmp.XXXXXX")
BUILD_PID=
on_exit() {
  # Interrupted mid-build: stop our own `go build`, drop the partial output.
  if [[ -n "$BUILD_PID" ]]; then
    kill "$BUILD_PID" 2>/dev/null || true
    wait "$BUILD_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP_DIR"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

GO_BUILD=(go build -trimpath -mod=readonly -buildvcs=false)
if [[ -n "${HAMI_K8S_BUILD_P:-}" ]]; then
  GO_BUILD+=(-p "$HAMI_K8S_BUILD_P")
fi

k8s_version_ldflags() {
  local minor=${K8S_VERSION#v1.}
  minor=${minor%%.*}
  local pkg flags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=${K8S_VERSION}"
    flags+=" -X $pkg.gitMajor=1"
    flags+=" -X $pkg.gitMinor=${minor}"
    flags+=" -X $pkg.gitCommit="
    flags+=" -X $pkg.gitTreeState=archive"
    flags+=" -X $pkg.buildDate=${K8S_BUILD_DATE}"
  done
  echo "$flags"
}

# build_one <binary> <module dir> <package> <version> <minutes> <ldflags> [build tags]
build_one() {
  local name=$1 moddir=$2 pkg=$3 version=$4 minutes=$5 ldflags=$6 tags=${7:-} start
  if [[ -x "$OUT_DIR/$name" ]]; then
    log "cached: $name $version"
    return 0
  fi
  log "building $name $version (first run only, ~$minutes min)"
  start=$SECONDS
  (
    cd "$MOD_ROOT/$moddir"
    CGO_ENABLED=0 exec "${GO_BUILD[@]}" -tags "$tags" -ldflags "$ldflags" -o "$TMP_DIR/$name" "$pkg"
  ) >&2 &
  BUILD_PID=$!
  wait "$BUILD_PID" || die "go build of $name failed"
  BUILD_PID=
  version_ok "$TMP_DIR/$name" "$name" ||
    die "built $name does not run or does not report $(expected_version "$name")"
  # Same filesystem, so the rename is atomic: a binary in OUT_DIR is complete.
  mv -f "$TMP_DIR/$name" "$OUT_DIR/$name"
  log "built $name in $((SECONDS - start)) s"
}

total_start=$SECONDS
K8S_LDFLAGS=$(k8s_version_ldflags)
# Minute estimates: measured cold on 2 cores (tests/e2e/README.md). The
# scheduler reuses most of the apiserver's compiled packages.
sched_minutes=4
[[ -x "$OUT_DIR/kube-apiserver" ]] || sched_minutes=1
build_one etcd etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" 2 "-s -w"
build_one kwok kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION" 2 \
  "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}"
build_one kube-apiserver kubernetes k8s.io/kubernetes/cmd/kube-apiserver "$K8S_VERSION" 5 "$K8S_LDFLAGS"
build_one kube-scheduler kubernetes k8s.io/kubernetes/cmd/kube-scheduler "$K8S_VERSION" "$sched_minutes" "$K8S_LDFLAGS"
# The Helm chart's test runs Deployments, DaemonSets and Jobs: their
# controllers, service accounts' tokens and garbage collection.
build_one kube-controller-manager kubernetes k8s.io/kubernetes/cmd/kube-controller-manager "$K8S_VERSION" "$sched_minutes" "$K8S_LDFLAGS"
# The real node (tests/e2e/README.md, "real node"). The storage drivers need
# cgo or kernel features the node does not use.
build_one kubelet kubernetes k8s.io/kubernetes/cmd/kubelet "$K8S_VERSION" 7 "$K8S_LDFLAGS"
CTRD_LDFLAGS="-s -w -X github.com/containerd/containerd/v2/version.Version=${CONTAINERD_VERSION}"
CTRD_TAGS="no_btrfs no_devmapper no_zfs"
for cmd in containerd containerd-shim-runc-v2 ctr; do
  build_one "$cmd" containerd "github.com/containerd/containerd/v2/cmd/$cmd" "$CONTAINERD_VERSION" 3 "$CTRD_LDFLAGS" "$CTRD_TAGS"
done

all_present || die "some binaries are still missing from $OUT_DIR"
log "all binaries ready in $OUT_DIR ($((SECONDS - total_start)) s)"
echo "$OUT_DIR"
