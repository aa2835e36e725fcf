# shellcheck shell=bash
# shellcheck disable=SC2154 # harness, repo, lib_here (lib.sh) and spawn (the sourcing script)
# The local real node: a bridge, containerd + runc + the CNI bridge plugin, kube-scheduler and a
# kubelet. Sourced by e2e/local/up and e2e/local/down after lib.sh; not executed.
#
# Addresses (all on the bridge the harness owns; nothing is routed off the machine):
#   198.18.0.0/25     pods (.10-.99, CNI host-local) and tailnet members (.100-.126); the bridge
#                     itself is 198.18.0.1, the node IP, where Headscale and the kubelet listen
#   198.18.0.128/25   the service range. There is no kube-proxy: the `kubernetes` Service's
#                     ClusterIP (198.18.0.129, the range's first address) is assigned to the
#                     bridge and kube-apiserver listens on it, port 443, so the
#                     KUBERNETES_SERVICE_HOST that the kubelet gives every pod reaches the
#                     apiserver without DNAT (ip_forward stays 0). Other ClusterIPs do not
#                     answer; the apiserver reaches webhooks through their endpoints
#                     (--enable-aggregator-routing).
#                     The cluster DNS works the same way: CoreDNS (started by up) listens on the
#                     `kube-dns` Service's ClusterIP 198.18.0.138:53, also an address of the bridge,
#                     and the kubelet gives it to pods as `clusterDNS`.
#   Pods get a route to the service range via 198.18.0.1 and no default route.

# shellcheck disable=SC2034 # used by up, down and the env file
node_name=tailnode-e2e
node_bridge=tnbr0
node_ip=198.18.0.1
node_pod_subnet=198.18.0.0/25
node_service_cidr=198.18.0.128/25
node_apiserver_ip=198.18.0.129
node_dns_ip=198.18.0.138
node_cluster_domain=cluster.local
node_cgroup=tailnode-e2e
node_dir="$harness/node"
node_sock="$node_dir/run/containerd.sock"
# kubelet (protectKernelDefaults: false) changes these; down puts them back.
node_sysctls=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

node_render() { # node_render TEMPLATE OUT
  sed -e "s|@HARNESS@|$harness|g" -e "s|@BRIDGE@|$node_bridge|g" -e "s|@NODE_IP@|$node_ip|g" \
    -e "s|@POD_SUBNET@|$node_pod_subnet|g" -e "s|@POD_RANGE_START@|198.18.0.10|g" \
    -e "s|@POD_RANGE_END@|198.18.0.99|g" -e "s|@SERVICE_CIDR@|$node_service_cidr|g" \
    -e "s|@CGROUP@|$node_cgroup|g" -e "s|@DNS_IP@|$node_dns_ip|g" -e "s|@CLUSTER_DOMAIN@|$node_cluster_domain|g" -e "s|@PAUSE_IMAGE@|${TAILNODE_E2E_PAUSE_IMAGE:-localhost/pause:e2e}|g" \
    "$lib_here/node/$1" >"$2"
}

# Which harness dir made the bridge; a harness that finds the bridge reads it to tell a live owner
# from a dead one (a machine restored from a snapshot, a killed run).
node_bridge_owner=/run/tailnode-e2e.bridge-owner

# node_bridge_in_use: something of a live harness still serves on the bridge, or the recorded owner
# still has a live process.
node_bridge_in_use() {
  if ss -ltnH "( src $node_apiserver_ip:443 or src $node_ip:8080 )" 2>/dev/null | grep -q .; then
    return 0
  fi
  local owner p
  owner=$(cat "$node_bridge_owner" 2>/dev/null) || return 1
  [ -d "$owner/pids" ] || return 1
  for p in "$owner"/pids/*; do
    [ -f "$p" ] || continue
    if kill -0 "$(cat "$p")" 2>/dev/null; then return 0; fi
  done
  return 1
}

# The bridge with the node IP and the apiserver's ClusterIP. Refuses the bridge of a live harness;
# takes over (and cleans up after) the bridge of a dead one.
node_bridge_up() {
  if ip link show "$node_bridge" >/dev/null 2>&1; then
    if node_bridge_in_use; then
      echo "[node] $node_bridge already exists: another harness owns it (run its e2e/local/down)" >&2
      return 1
    fi
    local owner m
    owner=$(cat "$node_bridge_owner" 2>/dev/null || true)
    echo "[node] $node_bridge is left over from a harness that is not running (${owner:-owner unknown}); removing it" >&2
    if [ -n "$owner" ] && [ "$owner" != / ]; then
      awk -v r="$owner/" 'index($5, r) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
      done
    fi
    ip link del "$node_bridge"
  fi
  # A fixed MAC: a bridge without one takes the lowest MAC of its ports, so a pod whose veth
  # sorts lower changes the gateway's MAC under every other pod, whose ARP entry for the node IP
  # then points nowhere until it expires: 10-45 s with no traffic between those pods and the
  # node (the apiserver, the kubelet's probes, Headscale). Found as lease timeouts, failed
  # probes and a write delivered 55 s late.
  ip link add "$node_bridge" address 02:74:6e:00:00:01 type bridge
  echo "$harness" >"$node_bridge_owner"
  ip addr add "$node_ip/25" dev "$node_bridge"
  ip addr add "$node_apiserver_ip/32" dev "$node_bridge"
  ip addr add "$node_dns_ip/32" dev "$node_bridge"
  ip link set "$node_bridge" up
}

node_containerd_start() {
  mkdir -p "$node_dir"/{run,containerd,cni/net.d,cni/ipam,kubelet/root,kubelet/pod-logs,kubelet/volume-plugins}
  node_render containerd.toml "$node_dir/containerd.toml"
  node_render cni.conflist "$node_dir/cni/net.d/10-tailnode-e2e.conflist"
  # No registry is reachable and none may be tried: image pulls go to a dead local proxy and fail
  # at once (every image the tests use is imported from a tarball).
  HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY='' \
    spawn containerd containerd --config "$node_dir/containerd.toml"
}

node_import_images() { # node_import_images TARBALL...
  local t
  for t in "$@"; do
    ctr --address "$node_sock" -n k8s.io images import "$t" >/dev/null
  done
}

node_kubelet_start() {
  local h k
  for h in /sys/fs/cgroup/*/; do mkdir -p "$h$node_cgroup"; done
  echo "nameserver $node_ip" >"$node_dir/kubelet/resolv.conf"
  if [ ! -f "$node_dir/sysctl.before" ]; then
    for k in "${node_sysctls[@]}"; do echo "$k=$(sysctl -n "$k")"; done >"$node_dir/sysctl.before"
  fi
  node_render kubelet.yaml "$node_dir/kubelet.yaml"
  spawn kubelet kubelet --config "$node_dir/kubelet.yaml" --kubeconfig "$harness/kubelet.kubeconfig" \
    --root-dir "$node_dir/kubelet/root" --hostname-override "$node_name" --node-ip "$node_ip" --v=1
}

# ---- teardown (down) ---------------------------------------------------------------------------

# Stops every pod sandbox through the CRI (containers die, CNI DEL releases veths and IPs).
node_remove_pods() {
  [ -S "$node_sock" ] || return 0
  local crictl_bin=${TAILNODE_TOOLS_DIR:-$repo/.tools}/bin/crictl
  [ -x "$crictl_bin" ] || crictl_bin=crictl
  local crictl=("$crictl_bin" --runtime-endpoint "unix://$node_sock" --image-endpoint "unix://$node_sock" --timeout 20s)
  local pods
  pods=$("${crictl[@]}" pods -q 2>/dev/null) || return 0
  [ -n "$pods" ] || return 0
  # shellcheck disable=SC2086 # one argument per pod id
  "${crictl[@]}" stopp $pods >/dev/null 2>&1 || true
  "${crictl[@]}" rmp -a -f >/dev/null 2>&1 || true
}

# Shims and containers left by a containerd that died: ours name our socket on their command line.
node_kill_leftovers() {
  local p
  for p in $(pgrep -f "containerd-shim-runc-v2 .*-address $node_sock" || true); do
    kill -KILL "$p" 2>/dev/null || true
  done
  # Container processes live in the node's cgroup; whatever is still there goes too.
  local h
  for h in /sys/fs/cgroup/*/; do
    [ -d "$h$node_cgroup" ] || continue
    find "$h$node_cgroup" -name cgroup.procs -exec cat {} + 2>/dev/null | while read -r p; do
      kill -KILL "$p" 2>/dev/null || true
    done
  done
}

node_cleanup_host() {
  local m h
  # tmpfs volumes of the kubelet, containerd's shm and rootfs mounts, netns bind mounts.
  awk -v r="$harness/" 'index($5, r) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  for h in /sys/fs/cgroup/*/; do
    [ -d "$h$node_cgroup" ] || continue
    find "$h$node_cgroup" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  local owner
  owner=$(cat "$node_bridge_owner" 2>/dev/null || true)
  if [ -z "$owner" ] || [ "$owner" = "$harness" ]; then
    ip link del "$node_bridge" 2>/dev/null || true
    rm -f "$node_bridge_owner"
  fi
  # libcni's result cache and containerd 1.6's fixed shim socket dir.
  rm -f /var/lib/cni/results/tailnode-e2e-* /var/lib/cni/results/cni-loopback-*
  rmdir /var/lib/cni/results /var/lib/cni 2>/dev/null || true
  find /run/containerd -depth -type d -empty -delete 2>/dev/null || true
  # The kubelet hard-codes these whatever its root dir.
  rm -rf /var/lib/kubelet/device-plugins /var/lib/kubelet/pod-resources /var/lib/kubelet/plugins_registry /var/lib/kubelet/plugins
  rmdir /var/lib/kubelet 2>/dev/null || true
  find /var/log/containers -maxdepth 1 -lname "$harness/*" -delete 2>/dev/null || true
  rmdir /var/log/containers /var/log/pods 2>/dev/null || true
  if [ -f "$node_dir/sysctl.before" ]; then
    local k v
    while IFS='=' read -r k v; do sysctl -q -w "$k=$v" 2>/dev/null || true; done <"$node_dir/sysctl.before"
  fi
}
