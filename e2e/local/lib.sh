# shellcheck shell=bash
# Shared helpers for e2e/local/up and e2e/local/down. Sourced, not executed.
#
# Harness layout (all under $harness, default <repo>/.harness, override TAILNODE_HARNESS_DIR):
#   env                 the export lines `up` prints (KUBECONFIG, TAILNODE_HEADSCALE_*, PATH, ...)
#   kubeconfig          admin kubeconfig (client cert CN=admin, O=system:masters)
#   kube-controller-manager.kubeconfig   its kubeconfig (client cert CN=system:kube-controller-manager)
#   ca.crt              CA that signed the apiserver serving cert and the admin client cert
#   headscale.apikey    headscale API key (Bearer token for /api/v1)
#   ports               KEY=VALUE port assignments
#   pki/                CA, serving/client certs, service-account key pair
#   etcd/               etcd data dir
#   headscale/          headscale config, policy, sqlite db, keys (socket too, unless the path is too long)
#   pids/<name>.pid     one per background process: etcd, kube-apiserver, kube-controller-manager,
#                       kube-scheduler, headscale, coredns, containerd, kubelet
#   node/               the real node's state: containerd, kubelet, CNI (see node.sh)
#   logs/<name>.log     their stdout+stderr

lib_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$lib_here/../.." && pwd)
harness=$(realpath -m "${TAILNODE_HARNESS_DIR:-$repo/.harness}")

# Every process the harness starts (down stops kube-controller-manager before the apiserver, etcd last).
# shellcheck disable=SC2034 # used by up and down
harness_procs=(kubelet kube-scheduler coredns tlsproxy headscale kube-controller-manager kube-apiserver etcd containerd)

# Paths end up unquoted in the env file and in YAML; refuse anything exotic rather than quote.
case $harness in
  *[!A-Za-z0-9_./+@%=,:-]*)
    printf '[harness] TAILNODE_HARNESS_DIR must be a plain path (letters, digits, _./+@%%=,:-): %s\n' "$harness" >&2
    exit 2
    ;;
esac

# One lock per harness dir, outside it (down removes the dir). Held on fd 9; children must not inherit it.
lock_file="${TMPDIR:-/tmp}/tailnode-harness-$(printf '%s' "$harness" | cksum | cut -d' ' -f1).lock"

harness_lock() {
  exec 9>"$lock_file"
  if ! flock -w 300 9; then
    printf '[harness] could not take %s within 300s (another up/down running?)\n' "$lock_file" >&2
    exit 1
  fi
}

# pid_of NAME: the recorded pid, if the process is alive and still ours (its command line mentions
# the harness dir, which guards against pid reuse). Prints nothing otherwise.
pid_of() {
  local f="$harness/pids/$1.pid" pid
  [ -r "$f" ] || return 0
  pid=$(cat "$f")
  case $pid in '' | *[!0-9]*) return 0 ;; esac
  [ -r "/proc/$pid/cmdline" ] || return 0
  if tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$harness/"; then
    printf '%s\n' "$pid"
  fi
}
