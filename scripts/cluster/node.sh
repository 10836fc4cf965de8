# shellcheck shell=bash
# Sourced by up.sh when it is given --node: start_node turns the control plane into a
# single-node cluster on this host, with everything a Pod needs:
#   containerd and runc from Debian (containerd's own root folder in the cache, so images
#   loaded once stay loaded), the CNI bridge and host-local plugins from Debian (a bridge,
#   bq0, for the Pod network 10.244.0.0/24), and the pause program built by build.sh as
#   the sandbox image;
#   kubelet, configured for this host (cgroup v1 with the cgroupfs driver, no swap check,
#   authentication and authorization through the API server, its serving certificate
#   signed by the cluster's CA);
#   kube-proxy (iptables mode), kube-router's firewall (the NetworkPolicy implementation:
#   its network policy controller alone, iptables rules and ipsets, ingress and egress) and
#   CoreDNS as host processes: CoreDNS answers on the host's address, behind the kube-dns
#   Service (10.0.0.10) and an EndpointSlice written here;
#   storage: a default StorageClass with hostPath PersistentVolumes in the state folder;
#   the Node labelled as a site and a GPU node, with nvidia.com/gpu in its capacity, as a
#   device plugin would report it (there is no accelerator here: a site that asks for one
#   is scheduled, and trains on the CPU);
#   Bouquet's images (scripts/images.sh) loaded into containerd.
# The host keeps: ip_forward on while the node runs (restored by down.sh), the iptables
# rules of kubelet, kube-proxy, kube-router and the CNI plugins, kube-router's ipsets, the
# bq0 bridge and the kubepods cgroups;
# stop_node in common.sh removes all of them. One node per host: the bridge, the cgroups
# and the KUBE-* chains are the host's, so a second would fight over them.
# shellcheck disable=SC2154 # state, pki, bin, here, api_port, host_ip come from up.sh

NODE_NAME=bouquet-node
POD_CIDR=10.244.0.0/24
DNS_IP=10.0.0.10
SANDBOX_IMAGE=bouquet.local/pause:3.10
# How many PersistentVolumes the node offers, and how large each says it is (hostPath does
# not enforce a size).
VOLUMES=24
VOLUME_SIZE=20Gi

# A docker-archive holding one image whose only file is the pause program, for
# `ctr images import`: manifest.json, the image's config and its one layer.
pause_archive() {
    local dir=$1 layer diff_id config_id
    mkdir -p "$dir/rootfs" "$dir/archive/layer"
    cp "$bin/pause" "$dir/rootfs/pause"
    tar -C "$dir/rootfs" --owner=0 --group=0 --numeric-owner -cf "$dir/archive/layer/layer.tar" pause
    diff_id=$(sha256sum "$dir/archive/layer/layer.tar" | cut -d' ' -f1)
    printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/pause"],"User":"65535:65535"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
        "$diff_id" >"$dir/config.json"
    config_id=$(sha256sum "$dir/config.json" | cut -d' ' -f1)
    mv "$dir/config.json" "$dir/archive/$config_id.json"
    printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["layer/layer.tar"]}]' "$config_id" "$SANDBOX_IMAGE" \
        >"$dir/archive/manifest.json"
    tar -C "$dir/archive" -cf "$dir/pause.tar" manifest.json "$config_id.json" layer
    echo "$dir/pause.tar"
}

start_node() {
    local node=$state/node root
    root=$(cd "$here/../.." && pwd)
    [[ $(id -u) -eq 0 ]] || die "--node needs root: containerd, the kubelet and kube-proxy manage cgroups, mounts and iptables"
    "$root/scripts/debian-packages.sh" containerd:containerd ctr:containerd runc:runc \
        /usr/lib/cni/bridge:containernetworking-plugins iptables:iptables conntrack:conntrack \
        ipset:ipset nft:nftables
    if [[ -s /run/bouquet-node ]]; then
        local other
        other=$(</run/bouquet-node)
        [[ $other == "$state" || ! -f $other/$MARKER ]] ||
            die "another Bouquet node runs on this host (its state is in $other): stop it first with scripts/cluster/down.sh $other"
    fi
    echo "$state" >/run/bouquet-node
    mkdir -p "$node"/{containerd,cni,cni-ipam,kubelet,pod-logs,volumes}
    # down.sh needs crictl and kube-proxy to clean up, and must not build them first.
    echo "$bin" >"$node/bin"
    mkdir -p "$CONTAINERD_ROOT"

    # Pods reach Services and each other through the host's routing.
    cat /proc/sys/net/ipv4/ip_forward >"$node/ip_forward.before"
    echo 1 >/proc/sys/net/ipv4/ip_forward

    local ports kubelet_port kubelet_healthz_port proxy_metrics_port proxy_healthz_port dns_port dns_health_port router_health_port
    mapfile -t ports < <(free_ports 7)
    kubelet_port=${ports[0]} kubelet_healthz_port=${ports[1]} proxy_metrics_port=${ports[2]}
    proxy_healthz_port=${ports[3]} dns_port=${ports[4]} dns_health_port=${ports[5]} router_health_port=${ports[6]}

    echo "Writing the node's certificates" >&2
    issue kubelet ca "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
    issue kubelet-serving ca "/CN=$NODE_NAME" serverAuth "IP:$host_ip,IP:127.0.0.1,DNS:$NODE_NAME"
    issue kube-proxy ca /CN=system:kube-proxy clientAuth
    issue coredns ca /CN=bouquet:coredns clientAuth
    issue kube-router ca /CN=bouquet:kube-router clientAuth
    write_kubeconfig "$pki/kubelet.kubeconfig" kubelet
    write_kubeconfig "$pki/kube-router.kubeconfig" kube-router
    write_kubeconfig "$pki/kube-proxy.kubeconfig" kube-proxy
    write_kubeconfig "$pki/coredns.kubeconfig" coredns

    # Keys and kubeconfigs above are for root only; what the node's components write (image
    # layers, Pod folders) must be as readable as the images and the kubelet mean it to be.
    umask 022

    # --- containerd ---
    local socket=$node/containerd/containerd.sock
    cat >"$node/containerd/config.toml" <<EOF
version = 2
root = "$CONTAINERD_ROOT"
state = "$node/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$socket"
[ttrpc]
  address = "$socket.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$node/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$SANDBOX_IMAGE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # Root here may not lower a process's oom_score_adj below its own (runc fails with
  # "can't get final child's PID from pipe" when asked to).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$node/cni"
EOF
    cat >"$node/cni/10-bouquet.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "bouquet",
  "plugins": [
    {
      "type": "bridge", "bridge": "bq0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$node/cni-ipam"}
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
    start containerd "$(command -v containerd)" --config "$node/containerd/config.toml"
    ctr_() { ctr --address "$socket" --namespace k8s.io "$@"; }
    wait_until containerd 30 ctr_ version

    echo "Loading the images into containerd" >&2
    if ! ctr_ images ls -q | grep -qxF "$SANDBOX_IMAGE"; then
        local scratch
        scratch=$(mktemp -d)
        ctr_ images import "$(pause_archive "$scratch")" >&2
        rm -rf "$scratch"
    fi
    "$root/scripts/images.sh" --containerd "$socket" >&2 || die "could not build or load Bouquet's images"

    # --- kubelet ---
    cat >"$node/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$socket
cgroupDriver: cgroupfs
# This host has swap off but a cgroup v1 hierarchy: 1.34 only warns about the latter.
failSwapOn: false
address: 0.0.0.0
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $kubelet_healthz_port
tlsCertFile: $pki/kubelet-serving.crt
tlsPrivateKeyFile: $pki/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization:
  mode: Webhook
clusterDNS: [$DNS_IP]
clusterDomain: cluster.local
podLogsDir: $node/pod-logs
# The disk is shared with the build caches: evict only when it is nearly full, and keep
# Bouquet's images (imported once, several GB) out of image garbage collection.
evictionHard: {memory.available: 200Mi, nodefs.available: 2%, imagefs.available: 2%, nodefs.inodesFree: 2%}
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
serializeImagePulls: false
EOF
    start kubelet "$bin/kubelet" --config "$node/kubelet.yaml" --kubeconfig "$pki/kubelet.kubeconfig" \
        --root-dir "$node/kubelet" --hostname-override "$NODE_NAME" --node-ip "$host_ip" \
        --volume-plugin-dir "$node/kubelet/volume-plugins" \
        --node-labels "bouquet.dev/site=true,bouquet.dev/gpu=true"
    node_ready() {
        [[ $("$bin/kubectl" --kubeconfig "$state/kubeconfig" get node "$NODE_NAME" \
            -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}') == True ]]
    }
    wait_until kubelet 120 node_ready

    # --- kube-proxy ---
    cat >"$node/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $pki/kube-proxy.kubeconfig}
mode: iptables
hostnameOverride: $NODE_NAME
clusterCIDR: $POD_CIDR
metricsBindAddress: 127.0.0.1:$proxy_metrics_port
healthzBindAddress: 127.0.0.1:$proxy_healthz_port
# Leave the host's conntrack table size alone.
conntrack: {maxPerCore: 0}
EOF
    start kube-proxy "$bin/kube-proxy" --config "$node/kube-proxy.yaml"
    proxy_healthy() { curl -sf --max-time 2 "http://127.0.0.1:$proxy_healthz_port/healthz" >/dev/null; }
    wait_until kube-proxy 60 proxy_healthy

    # --- kube-router's firewall: the NetworkPolicy implementation ---
    # What its network policy controller reads (upstream's own ClusterRole, less what its
    # router and service proxy would write), and nothing else.
    "$bin/kubectl" --kubeconfig "$state/kubeconfig" apply --server-side --field-manager bouquet-cluster -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "bouquet:kube-router"}
rules:
  - {apiGroups: [""], resources: [namespaces, pods, services, nodes, endpoints], verbs: [get, list, watch]}
  - {apiGroups: [networking.k8s.io], resources: [networkpolicies], verbs: [get, list, watch]}
  - {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [get, list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "bouquet:kube-router"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "bouquet:kube-router"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "bouquet:kube-router"}]
EOF
    # Pods on the bridge reach each other through it, which iptables sees only with bridge
    # netfilter on (restored by down.sh).
    if [[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]]; then
        cat /proc/sys/net/bridge/bridge-nf-call-iptables >"$node/bridge-nf-call-iptables.before"
        echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables
    fi
    start kube-router "$bin/kube-router" --run-firewall=true --run-router=false --run-service-proxy=false \
        --enable-cni=false --kubeconfig "$pki/kube-router.kubeconfig" --hostname-override "$NODE_NAME" \
        --service-cluster-ip-range "$SERVICE_CIDR" --health-port "$router_health_port" --metrics-port 0
    router_healthy() { curl -sf --max-time 2 "http://127.0.0.1:$router_health_port/healthz" >/dev/null; }
    wait_until kube-router 60 router_healthy

    # --- CoreDNS, behind the kube-dns Service ---
    "$bin/kubectl" --kubeconfig "$state/kubeconfig" apply --server-side --field-manager bouquet-cluster -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "bouquet:coredns"}
rules:
  - {apiGroups: [""], resources: [services, pods, namespaces], verbs: [list, watch]}
  - {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "bouquet:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "bouquet:coredns"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "bouquet:coredns"}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $DNS_IP
  ports:
    - {name: dns, port: 53, protocol: UDP, targetPort: $dns_port}
    - {name: dns-tcp, port: 53, protocol: TCP, targetPort: $dns_port}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-host
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: bouquet-cluster}
addressType: IPv4
endpoints: [{addresses: ["$host_ip"], conditions: {ready: true}, nodeName: $NODE_NAME}]
ports:
  - {name: dns, port: $dns_port, protocol: UDP}
  - {name: dns-tcp, port: $dns_port, protocol: TCP}
EOF
    cat >"$node/Corefile" <<EOF
.:$dns_port {
    bind $host_ip
    errors
    health 127.0.0.1:$dns_health_port
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $pki/coredns.kubeconfig bouquet
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 30
}
EOF
    start coredns "$bin/coredns" -conf "$node/Corefile"
    dns_healthy() { curl -sf --max-time 2 "http://127.0.0.1:$dns_health_port/health" >/dev/null; }
    wait_until coredns 60 dns_healthy

    # --- storage, labels, the GPU ---
    local i volumes=""
    for ((i = 0; i < VOLUMES; i++)); do
        mkdir -p "$node/volumes/pv$i"
        # Any Pod's user may write: the images run as an unprivileged user, and hostPath
        # volumes ignore fsGroup.
        chmod 0777 "$node/volumes/pv$i"
        volumes+="---
apiVersion: v1
kind: PersistentVolume
metadata: {name: bouquet-local-pv$i, labels: {bouquet.dev/cluster-volume: \"true\"}}
spec:
  storageClassName: local
  capacity: {storage: $VOLUME_SIZE}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  hostPath: {path: $node/volumes/pv$i, type: Directory}
  nodeAffinity:
    required:
      nodeSelectorTerms: [{matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [$NODE_NAME]}]}]
"
    done
    "$bin/kubectl" --kubeconfig "$state/kubeconfig" apply --server-side --field-manager bouquet-cluster -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
$volumes
EOF
    "$bin/kubectl" --kubeconfig "$state/kubeconfig" patch node "$NODE_NAME" --subresource status --type merge \
        -p '{"status": {"capacity": {"nvidia.com/gpu": "2"}}}' >/dev/null
}
