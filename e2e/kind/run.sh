#!/usr/bin/env bash
# The end-to-end scenarios on a kind cluster, for machines with Docker. The scenarios are the
# same code as on the local real node (`cargo test --features harness --test e2e`, tests/e2e/); this script only
# makes the cluster, loads the images, runs Headscale in it, and points the scenarios at them.
#
#   e2e/kind/run.sh           # create (or reuse) the cluster, load images, run the scenarios
#   e2e/kind/run.sh --check   # only check the prerequisites and print the plan
#
# Env: CLUSTER (default tailnode-e2e); KIND_NODE_IMAGE (default: kind's own; Kubernetes 1.29+ for
# native sidecars); KEEP_CLUSTER=1 keeps a cluster this run created. A cluster that already
# existed is reused and never deleted. Needs docker, kind, kubectl, helm, cargo, go, python3 and
# the Debian packages e2e/local/tools installs; the images are built by e2e/local/images (no
# `docker build`), so the sidecar is the same tailscale build the local node runs.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
CLUSTER=${CLUSTER:-tailnode-e2e}
HS_LOCAL_PORT=${HS_LOCAL_PORT:-18080}

log() { printf '\n==> %s\n' "$*" >&2; }
fail() {
  printf 'FAIL: %s\n' "$*" >&2
  exit 1
}
plan() {
  cat <<EOF
Plan (cluster '$CLUSTER'):
  1. kind create cluster --config e2e/kind/kind-config.yaml (reused if it exists)
  2. bash e2e/local/images; kind load image-archive for the app, sidecar and operator images
  3. Headscale in the cluster: kubectl apply -f e2e/kind/headscale.yaml; user, API key;
     kubectl port-forward to 127.0.0.1:$HS_LOCAL_PORT for the scenarios' Headscale API checks
  4. TAILNODE_E2E_EXTERNAL=1 cargo test --locked --features harness --test e2e   (the same scenarios as
     e2e/local/test: they install charts/tailnode with helm, run real pods, and uninstall it)
  5. delete the cluster (unless it was reused or KEEP_CLUSTER=1)
EOF
}

check() {
  local ok=0 tool
  for tool in docker kind kubectl helm cargo go python3; do
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
  for f in charts/tailnode/Chart.yaml e2e/kind/kind-config.yaml e2e/kind/headscale.yaml e2e/local/images tests/e2e/main.rs; do
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
forward_pid=""
on_exit() {
  local rc=$?
  [ -z "$forward_pid" ] || kill "$forward_pid" 2>/dev/null || true
  if [ "$rc" -ne 0 ]; then
    log "diagnostics"
    kubectl get pods -A -o wide || true
    kubectl -n headscale logs deploy/headscale --tail=50 || true
  fi
  if [ "$created" = 1 ] && [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    kind delete cluster --name "$CLUSTER" || true
  fi
  exit "$rc"
}
trap on_exit EXIT

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
kubeconfig=$(mktemp)
kind get kubeconfig --name "$CLUSTER" >"$kubeconfig"

log "2. images (OCI tarballs from e2e/local/images)"
eval "$(bash "$repo/e2e/local/images")"
# shellcheck disable=SC2086 # space-separated paths without spaces
for tarball in $TAILNODE_IMAGE_TARBALLS; do
  case $tarball in */pause.tar) continue ;; esac # kind brings its own sandbox image
  kind load image-archive "$tarball" --name "$CLUSTER"
done

log "3. Headscale"
kubectl apply -f "$here/headscale.yaml"
kubectl -n headscale rollout status deploy/headscale --timeout=240s
hs() { kubectl -n headscale exec deploy/headscale -- headscale "$@"; }
hs users list -o json | grep -q '"name": *"tailnode"' || hs users create tailnode >/dev/null
user_id=$(hs users list -o json | python3 -c 'import json,sys; print(next(u["id"] for u in json.load(sys.stdin) if u["name"] == "tailnode"))')
api_key=$(hs apikeys create --expiration 24h | tail -n1 | tr -d '[:space:]')
[ -n "$api_key" ] || fail "headscale printed no API key"
kubectl -n headscale port-forward svc/headscale "$HS_LOCAL_PORT:8080" >/dev/null 2>&1 &
forward_pid=$!

log "4. the scenarios (tests/e2e, the same entry point as e2e/local/test)"
cd "$repo"
# kind's pods have a default route and their peers are the kind network: the local harness's
# network-discipline checks (no default route, bridge-only peers) do not apply here.
TAILNODE_E2E_EXTERNAL=1 \
  KUBECONFIG="$kubeconfig" \
  TAILNODE_E2E_HEADSCALE_URL=http://headscale.headscale.svc.cluster.local:8080 \
  TAILNODE_HEADSCALE_URL="http://127.0.0.1:$HS_LOCAL_PORT" \
  TAILNODE_HEADSCALE_API_KEY="$api_key" \
  TAILNODE_HEADSCALE_USER_ID="$user_id" \
  TAILNODE_E2E_ISOLATED=0 \
  TAILNODE_E2E_CLUSTER_CIDRS=10.244.0.0/16,10.96.0.0/12 \
  cargo test --locked --features harness --test e2e

log "all scenarios passed"
