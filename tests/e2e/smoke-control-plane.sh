#!/usr/bin/env bash
# Smoke test of the control plane built by build-k8s.sh: start etcd,
# kube-apiserver, kube-scheduler and kwok on 127.0.0.1 in a temp dir, create
# one fake node and one pod, wait until the scheduler binds the pod and kwok
# reports it Running, then stop everything and delete the temp dir.
#
#   tests/e2e/smoke-control-plane.sh            # exit 0 on success
#   KEEP=1 tests/e2e/smoke-control-plane.sh     # keep the temp dir (logs)
#
# The flags used here are the reference set documented in tests/e2e/README.md.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BIN=$("$SCRIPT_DIR/build-k8s.sh" | tail -1)

log() { printf 'smoke: %s\n' "$*" >&2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hami-e2e-smoke.XXXXXX")
PIDS=()
cleanup() {
  local rc=$? pid
  if [[ $rc -ne 0 && -n "${API:-}" ]]; then
    log "---- nodes and pods at failure"
    "${CURL[@]}" "$API/api/v1/nodes" >&2 2>/dev/null || true
    "${CURL[@]}" "$API/api/v1/pods" >&2 2>/dev/null || true
  fi
  # Stop in reverse start order, each by its own pid.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid=${PIDS[i]}
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ $rc -ne 0 ]]; then
    for f in "$WORK"/*.log; do
      [[ -f "$f" ]] || continue
      log "---- last lines of $(basename "$f")"
      tail -n 20 "$f" >&2 || true
    done
  fi
  if [[ -n "${KEEP:-}" ]]; then
    log "kept $WORK"
  else
    rm -rf "$WORK"
  fi
  exit $rc
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_for <what> <seconds> <command...>: retry the command every 0.2 s.
wait_for() {
  local what=$1 secs=$2 i
  shift 2
  for ((i = 0; i < secs * 5; i++)); do
    if "$@" >/dev/null 2>&1; then
      log "$what ready after $((i / 5)).$((i % 5 * 2)) s"
      return 0
    fi
    sleep 0.2
  done
  log "$what not ready after $secs s"
  return 1
}

ETCD_PORT=$(free_port)
ETCD_PEER_PORT=$(free_port)
API_PORT=$(free_port)
SCHED_PORT=$(free_port)
KWOK_PORT=$(free_port)

# ---- certificates: a CA, the apiserver's serving cert, an admin client cert
# (O=system:masters, so RBAC lets it do anything), a service-account key pair.
cd "$WORK"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=hami-e2e-ca" \
  -keyout ca.key -out ca.crt 2>/dev/null
cat >serving.ext <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
EOF
openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
  -keyout serving.key -out serving.csr 2>/dev/null
openssl x509 -req -in serving.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
  -days 2 -extfile serving.ext -out serving.crt 2>/dev/null
cat >client.ext <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
EOF
openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=admin" \
  -keyout admin.key -out admin.csr 2>/dev/null
openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
  -days 2 -extfile client.ext -out admin.crt 2>/dev/null
openssl genrsa -out sa.key 2048 2>/dev/null
openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null

cat >admin.kubeconfig <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: https://127.0.0.1:${API_PORT}
    certificate-authority: ${WORK}/ca.crt
users:
- name: admin
  user:
    client-certificate: ${WORK}/admin.crt
    client-key: ${WORK}/admin.key
contexts:
- name: e2e
  context: {cluster: e2e, user: admin}
current-context: e2e
EOF

CURL=(curl -sS --fail --max-time 5 --cacert "$WORK/ca.crt" --cert "$WORK/admin.crt" --key "$WORK/admin.key")
API="https://127.0.0.1:${API_PORT}"

# ---- etcd
"$BIN/etcd" \
  --name=e2e \
  --data-dir="$WORK/etcd-data" \
  --listen-client-urls="http://127.0.0.1:${ETCD_PORT}" \
  --advertise-client-urls="http://127.0.0.1:${ETCD_PORT}" \
  --listen-peer-urls="http://127.0.0.1:${ETCD_PEER_PORT}" \
  --initial-advertise-peer-urls="http://127.0.0.1:${ETCD_PEER_PORT}" \
  --initial-cluster="e2e=http://127.0.0.1:${ETCD_PEER_PORT}" \
  --unsafe-no-fsync \
  --log-level=warn \
  >etcd.log 2>&1 &
PIDS+=($!)
wait_for etcd 30 curl -sS --fail --max-time 2 "http://127.0.0.1:${ETCD_PORT}/health"

# ---- kube-apiserver
"$BIN/kube-apiserver" \
  --etcd-servers="http://127.0.0.1:${ETCD_PORT}" \
  --bind-address=127.0.0.1 \
  --advertise-address=127.0.0.1 \
  --secure-port="${API_PORT}" \
  --tls-cert-file="$WORK/serving.crt" \
  --tls-private-key-file="$WORK/serving.key" \
  --client-ca-file="$WORK/ca.crt" \
  --requestheader-client-ca-file="$WORK/ca.crt" \
  --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User \
  --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --authorization-mode=RBAC \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$WORK/sa.pub" \
  --service-account-signing-key-file="$WORK/sa.key" \
  --service-cluster-ip-range=10.96.0.0/16 \
  --disable-admission-plugins=ServiceAccount,TaintNodesByCondition \
  --endpoint-reconciler-type=none \
  --cert-dir="$WORK/apiserver-certs" \
  --profiling=false \
  >kube-apiserver.log 2>&1 &
PIDS+=($!)
wait_for kube-apiserver 90 "${CURL[@]}" "$API/readyz"
log "readyz: $("${CURL[@]}" "$API/readyz")"
log "version: $("${CURL[@]}" "$API/version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["gitVersion"])')"

# ---- kube-scheduler
cat >scheduler.yaml <<EOF
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection:
  kubeconfig: ${WORK}/admin.kubeconfig
leaderElection:
  leaderElect: false
EOF
"$BIN/kube-scheduler" \
  --config="$WORK/scheduler.yaml" \
  --authentication-kubeconfig="$WORK/admin.kubeconfig" \
  --authorization-kubeconfig="$WORK/admin.kubeconfig" \
  --bind-address=127.0.0.1 \
  --secure-port="${SCHED_PORT}" \
  >kube-scheduler.log 2>&1 &
PIDS+=($!)
wait_for kube-scheduler 60 curl -sSk --fail --max-time 2 "https://127.0.0.1:${SCHED_PORT}/readyz"

# ---- kwok (fakes nodes annotated kwok.x-k8s.io/node=fake and their pods).
# An explicit, empty config keeps a developer's ~/.kwok/kwok.yaml out of it;
# with no Stage objects kwok uses its built-in fast node and pod stages.
cat >kwok.yaml <<EOF
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options: {}
EOF
"$BIN/kwok" \
  --kubeconfig="$WORK/admin.kubeconfig" \
  --manage-all-nodes=false \
  --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
  --node-lease-duration-seconds=40 \
  --server-address="127.0.0.1:${KWOK_PORT}" \
  --config="$WORK/kwok.yaml" \
  >kwok.log 2>&1 &
PIDS+=($!)
wait_for kwok 30 curl -sS --fail --max-time 2 "http://127.0.0.1:${KWOK_PORT}/healthz"

# ---- one fake node, one pod
"${CURL[@]}" -X POST -H 'Content-Type: application/json' "$API/api/v1/nodes" -d @- >/dev/null <<'EOF'
{"apiVersion":"v1","kind":"Node",
 "metadata":{"name":"kwok-node-0","annotations":{"kwok.x-k8s.io/node":"fake"},
             "labels":{"type":"kwok","kubernetes.io/hostname":"kwok-node-0"}},
 "status":{"allocatable":{"cpu":"32","memory":"256Gi","pods":"110"},
           "capacity":{"cpu":"32","memory":"256Gi","pods":"110"}}}
EOF
node_ready() {
  "${CURL[@]}" "$API/api/v1/nodes/kwok-node-0" | python3 -c '
import json, sys
n = json.load(sys.stdin)
sys.exit(0 if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", [])) else 1)'
}
wait_for "node kwok-node-0 (condition Ready)" 30 node_ready

"${CURL[@]}" -X POST -H 'Content-Type: application/json' "$API/api/v1/namespaces/default/pods" -d @- >/dev/null <<'EOF'
{"apiVersion":"v1","kind":"Pod",
 "metadata":{"name":"smoke-pod"},
 "spec":{"containers":[{"name":"c","image":"fake-image",
                        "resources":{"requests":{"cpu":"100m","memory":"64Mi"}}}]}}
EOF
pod_running() {
  "${CURL[@]}" "$API/api/v1/namespaces/default/pods/smoke-pod" | python3 -c '
import json, sys
p = json.load(sys.stdin)
sys.exit(0 if p["spec"].get("nodeName") == "kwok-node-0" and p["status"].get("phase") == "Running" else 1)'
}
wait_for "pod smoke-pod (bound, phase Running)" 60 pod_running

log "ok: etcd, kube-apiserver, kube-scheduler and kwok work together"
