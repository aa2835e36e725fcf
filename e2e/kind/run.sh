#!/usr/bin/env bash
# End-to-end run on a real kind cluster: the tailnode image and chart, Headscale inside the
# cluster, real pods with the real tailscale/tailscale sidecar. The same scenarios as the local
# harness (tests/harness_tailnet_e2e.rs), with a real kubelet and container runtime.
#
#   e2e/kind/run.sh           # create (or reuse) the cluster, build, install, run the scenarios
#   e2e/kind/run.sh --check   # only check the prerequisites and print the plan
#
# Env: CLUSTER (default tailnode-e2e); KIND_NODE_IMAGE (default: kind's own; Kubernetes 1.29+ for
# native sidecars); KEEP_CLUSTER=1 keeps a cluster this run created. A cluster that already
# existed is reused and never deleted. Needs docker, kind, kubectl, helm, jq and internet access
# (images: tailscale/tailscale, headscale/headscale, nginx-unprivileged, curl, pause).
#
# ASSUMPTION: charts/tailnode is written separately; e2e/kind/values.yaml assumes it takes
#   image.repository, image.tag, controlURL, credentials.kind=headscale, credentials.existingSecret
#   (a Secret in the release namespace with key `api-key`), credentials.headscaleURL and
#   credentials.headscaleUser, and that it installs the CRD and a webhook that injects labelled
#   pods outside its own namespace. tests/harness_examples.rs renders the chart with these values.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
CLUSTER=${CLUSTER:-tailnode-e2e}
OP_NS=tailnode-system
WAIT=240s

log() { printf '\n==> %s\n' "$*" >&2; }
fail() {
  printf 'FAIL: %s\n' "$*" >&2
  exit 1
}
plan() {
  cat <<EOF
Plan (cluster '$CLUSTER'):
  1. kind create cluster --config e2e/kind/kind-config.yaml (reused if it exists)
  2. docker build -t tailnode:e2e . ; kind load docker-image tailnode:e2e
  3. Headscale: kubectl apply -f e2e/kind/headscale.yaml; user 'tailnode', API key, client pre-auth key
  4. Secret $OP_NS/tailnode-credentials (api-key); helm install tailnode charts/tailnode -f e2e/kind/values.yaml
  5. kubectl apply -f e2e/kind/nodes.yaml, then e2e/kind/workloads.yaml and e2e/kind/client.yaml
  6. scenarios:
     a. userspace Deployment joins: TailscaleNode web readyReplicas=1, sidecar injected
     b. a plain tailscale client pod curls the app over the tailnet (SOCKS5, tailnet IP)
     c. serve config applied: tailnet :9000 -> tcp://127.0.0.1:8080 answers
     d. pod web's token cannot read db-0's state Secret (kubectl auth can-i)
     e. deleting StatefulSet pod db-0 keeps its device (same device_id after the restart)
     f. deleting the Deployment pod removes its node from Headscale
     g. TUN mode pod has a tailscale0 interface
  7. delete the cluster (unless it was reused or KEEP_CLUSTER=1)
EOF
}

check() {
  local ok=0 tool
  for tool in docker kind kubectl helm jq base64; do
    if command -v "$tool" >/dev/null 2>&1; then
      echo "ok      $tool"
    else
      echo "MISSING $tool"
      ok=1
    fi
  done
  if command -v docker >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
    echo "MISSING a reachable Docker daemon (docker info failed)"
    ok=1
  fi
  for f in Dockerfile charts/tailnode/Chart.yaml e2e/kind/kind-config.yaml e2e/kind/values.yaml \
    e2e/kind/headscale.yaml e2e/kind/nodes.yaml e2e/kind/workloads.yaml e2e/kind/client.yaml; do
    if [ -e "$repo/$f" ]; then echo "ok      $f"; else
      echo "MISSING $f"
      ok=1
    fi
  done
  return "$ok"
}

if [ "${1:-}" = --check ]; then
  plan
  echo
  if check; then echo "prerequisites: ok"; else
    echo "prerequisites: missing (see above)"
    exit 1
  fi
  exit 0
fi
check >&2 || fail "prerequisites missing (run with --check)"

created=0
on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    log "diagnostics"
    kubectl get pods -A -o wide || true
    kubectl get tailscalenodes -A -o wide || true
    kubectl -n "$OP_NS" logs -l app.kubernetes.io/name=tailnode --tail=100 --all-containers || true
    kubectl -n headscale logs deploy/headscale --tail=50 || true
    kubectl -n e2e describe pods || true
  fi
  if [ "$created" = 1 ] && [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    kind delete cluster --name "$CLUSTER" || true
  fi
  exit "$rc"
}
trap on_exit EXIT

hs() { kubectl -n headscale exec deploy/headscale -- headscale "$@"; }
secret_key() { kubectl -n "$1" get secret "$2" -o jsonpath="{.data.$3}" | base64 -d; }
can_i() { kubectl auth can-i "$@" 2>/dev/null || true; }
pod_of() { kubectl -n "$1" get pods -l "app=$2" --field-selector=status.phase=Running -o jsonpath='{.items[0].metadata.name}'; }
# retry SECONDS CMD...: runs CMD every 2s until it succeeds.
retry() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 2
  done
}
tailnet_curl() { # tailnet_curl URL: from the client pod, through its SOCKS5 proxy
  kubectl -n e2e-client exec client -c curl -- curl -fsS --max-time 10 --socks5-hostname localhost:1055 "$1"
}
node_in_headscale() { hs nodes list -o json | jq -e --arg id "$1" 'any(.[]; (.id | tostring) == $id)' >/dev/null; }
node_gone() { ! node_in_headscale "$1"; }
containers() { kubectl -n "$1" get pod "$2" -o jsonpath='{.spec.initContainers[*].name} {.spec.containers[*].name}'; }
injected() { # the webhook answers and knows the TailscaleNodes (server dry run: nothing stored)
  local names
  names=$(kubectl -n e2e-tun run probe --image=registry.k8s.io/pause:3.10 --labels=tailnode.dev/node=tun \
    --dry-run=server -o jsonpath='{.spec.initContainers[*].name} {.spec.containers[*].name}') || return 1
  [[ " $names " == *" tailscale "* ]]
}

log "1. cluster $CLUSTER"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  echo "reusing the existing cluster"
else
  image=()
  [ -z "${KIND_NODE_IMAGE:-}" ] || image=(--image "$KIND_NODE_IMAGE")
  kind create cluster --name "$CLUSTER" --config "$here/kind-config.yaml" "${image[@]}" --wait 120s
  created=1
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null

log "2. image"
docker build -t tailnode:e2e "$repo"
kind load docker-image tailnode:e2e --name "$CLUSTER"

log "3. Headscale"
kubectl apply -f "$here/headscale.yaml"
kubectl -n headscale rollout status deploy/headscale --timeout="$WAIT"
hs users list -o json | jq -e 'any(.[]; .name == "tailnode")' >/dev/null || hs users create tailnode >/dev/null
user_id=$(hs users list -o json | jq -r '.[] | select(.name == "tailnode") | .id')
api_key=$(hs apikeys create --expiration 24h | tail -n1 | tr -d '[:space:]')
client_key=$(hs preauthkeys create --user "$user_id" --reusable --expiration 2h -o json | jq -r .key)
if [ -z "$api_key" ] || [ -z "$client_key" ]; then fail "headscale printed no API key or pre-auth key"; fi

log "4. operator"
kubectl create namespace "$OP_NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$OP_NS" create secret generic tailnode-credentials --from-literal=api-key="$api_key" \
  --dry-run=client -o yaml | kubectl apply -f -
helm upgrade --install tailnode "$repo/charts/tailnode" --namespace "$OP_NS" --wait --timeout 5m \
  -f "$here/values.yaml"

log "5. TailscaleNodes, workloads, client"
kubectl apply -f "$here/nodes.yaml"
retry 60 injected || fail "the webhook does not inject a labelled pod (server dry run)"
kubectl apply -f "$here/workloads.yaml"
kubectl create namespace e2e-client --dry-run=client -o yaml | kubectl apply -f -
kubectl -n e2e-client create secret generic client-authkey --from-literal=authkey="$client_key" \
  --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -f "$here/client.yaml"

log "6a. userspace Deployment joins"
kubectl -n e2e rollout status deploy/web --timeout="$WAIT"
kubectl -n e2e wait tsn/web --for=jsonpath='{.status.readyReplicas}'=1 --timeout="$WAIT"
web_pod=$(pod_of e2e web)
[[ " $(containers e2e "$web_pod") " == *" tailscale "* ]] || fail "pod $web_pod has no tailscale sidecar"
web_ip=$(kubectl -n e2e get tsn web -o jsonpath='{.status.replicas[0].ips[0]}')
echo "pod $web_pod is on the tailnet at $web_ip"

log "6b. the client reaches the app over the tailnet"
kubectl -n e2e-client wait pod/client --for=condition=Ready --timeout="$WAIT"
retry 90 tailnet_curl "http://$web_ip:8080/" >/dev/null || fail "no answer from http://$web_ip:8080/ over the tailnet"
[[ "$(tailnet_curl "http://$web_ip:8080/")" == *nginx* ]] || fail "unexpected answer from the app"

log "6c. serve config applied"
[[ "$(kubectl -n e2e get configmap tsn-web-serve -o jsonpath='{.data.serve\.json}')" == *TCPForward* ]] ||
  fail "ConfigMap tsn-web-serve has no TCP forward"
retry 60 tailnet_curl "http://$web_ip:9000/" >/dev/null || fail "serve forward tailnet :9000 -> :8080 does not answer"

log "6d. per-pod Secret isolation"
kubectl -n e2e rollout status statefulset/db --timeout="$WAIT"
kubectl -n e2e wait tsn/db --for=jsonpath='{.status.readyReplicas}'=1 --timeout="$WAIT"
web_sa=system:serviceaccount:e2e:web
[ "$(can_i get "secret/ts-$web_pod" -n e2e --as="$web_sa")" = yes ] || fail "web cannot read its own Secret"
[ "$(can_i get secret/ts-db-0 -n e2e --as="$web_sa")" = no ] || fail "web can read db-0's Secret"
[ "$(can_i list secrets -n e2e --as="$web_sa")" = no ] || fail "web can list Secrets"

log "6e. a restarted StatefulSet pod keeps its device"
db_device=$(secret_key e2e ts-db-0 device_id)
[ -n "$db_device" ] || fail "ts-db-0 has no device_id"
old_uid=$(kubectl -n e2e get pod db-0 -o jsonpath='{.metadata.uid}')
kubectl -n e2e delete pod db-0 --wait=true
new_pod() {
  local uid
  uid=$(kubectl -n e2e get pod db-0 -o jsonpath='{.metadata.uid}' 2>/dev/null) || return 1
  [ -n "$uid" ] && [ "$uid" != "$old_uid" ]
}
retry 120 new_pod || fail "db-0 was not recreated"
kubectl -n e2e wait pod/db-0 --for=condition=Ready --timeout="$WAIT"
kubectl -n e2e wait tsn/db --for=jsonpath='{.status.readyReplicas}'=1 --timeout="$WAIT"
[ "$(secret_key e2e ts-db-0 device_id)" = "$db_device" ] || fail "db-0 came back as a new device"
node_in_headscale "$db_device" || fail "Headscale lost db-0's node $db_device"

log "6f. a deleted Deployment pod leaves the tailnet"
web_device=$(secret_key e2e "ts-$web_pod" device_id)
node_in_headscale "$web_device" || fail "Headscale does not list $web_pod's node $web_device"
kubectl -n e2e delete pod "$web_pod" --wait=true
retry 120 node_gone "$web_device" || fail "Headscale still lists the deleted pod's node $web_device"

log "6g. TUN mode gets tailscale0"
kubectl -n e2e-tun rollout status deploy/tun --timeout="$WAIT"
kubectl -n e2e-tun wait tsn/tun --for=jsonpath='{.status.readyReplicas}'=1 --timeout="$WAIT"
kubectl -n e2e-tun exec deploy/tun -c tailscale -- ip link show tailscale0 || fail "no tailscale0 in the TUN pod"

log "all scenarios passed"
