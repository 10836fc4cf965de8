#!/usr/bin/env bash
# Starts a Kubernetes cluster for tests: etcd, kube-apiserver, kube-controller-manager and
# kube-scheduler (built by build.sh), with their own CA, certificates and kubeconfigs, on
# free ports on loopback. Without --node no kubelet runs: Pods are created, scheduled nowhere
# and stay Pending, but every API and controller behaves as in a real cluster. With --node
# the host becomes the cluster's one node (node.sh: containerd, kubelet, kube-proxy, CoreDNS,
# storage and Bouquet's images; root only), and the API server listens on the host's
# address too, where Pods reach it through the `kubernetes` Service.
#
# Usage: scripts/cluster/up.sh [--node] [STATE_DIR]
#   STATE_DIR defaults to $BOUQUET_CLUSTER_DIR, else /tmp/bouquet-cluster. It receives pki/,
#   logs/<component>.log, pids/<component>.pid, etcd/ and kubeconfig (cluster-admin).
#   STATE_DIR/bin holds the kubectl of the cluster's release and helm. On stdout come two
#   lines, `export PATH=STATE_DIR/bin:$PATH` and last `export KUBECONFIG=STATE_DIR/kubeconfig`;
#   all else goes to stderr, so `eval "$(scripts/cluster/up.sh)"` works.
# A cluster already up and healthy in STATE_DIR is left as it is; the remains of one that is
# not (a crash, a reboot) are stopped and replaced. scripts/cluster/down.sh stops it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"
# shellcheck source=node.sh
source "$here/node.sh"

with_node=
if [[ ${1:-} == --node ]]; then
    with_node=1
    shift
fi
state=$(state_dir "${1:-}")
export_lines="export PATH=$state/bin:\$PATH
export KUBECONFIG=$state/kubeconfig"
pki=$state/pki
# The Service network; the API server takes its first address for the `kubernetes` Service.
SERVICE_CIDR=10.0.0.0/24
SERVICE_IP=10.0.0.1

# One up.sh or down.sh at a time per state folder: the lock is the folder's parent, which
# outlives the state folder itself. The components must not inherit it (9>&- below).
mkdir -p "$(dirname "$state")"
exec 9<"$(dirname "$state")"
flock 9

api_url() { sed -n 's/^ *server: *//p' "$state/kubeconfig" 2>/dev/null | head -1; }
admin_curl() { curl -sf --max-time 5 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$@"; }
# running NAME: whether the process in pids/NAME.pid is NAME of this cluster.
running() {
    [[ -s $state/pids/$1.pid ]] || return 1
    # Not `cluster_pids | grep -q`: grep leaving early fails the pipeline under pipefail.
    [[ $'\n'$(cluster_pids "$state")$'\n' == *$'\n'"$(<"$state/pids/$1.pid")"$'\n'* ]]
}

healthy() {
    local name
    [[ -f $state/$MARKER && -f $state/kubeconfig ]] || return 1
    # A cluster with a node is what either call asks for; one without is not what --node asks.
    [[ -z $with_node || -d $state/node ]] || return 1
    for name in "${COMPONENTS[@]}"; do
        [[ -d $state/node ]] || [[ " $NODE_COMPONENTS " != *" $name "* ]] || continue
        running "$name" || return 1
    done
    [[ $(admin_curl "$(api_url)/readyz" 2>/dev/null) == ok ]]
}

if healthy; then
    echo "The cluster in $state is up." >&2
    echo "$export_lines"
    exit 0
fi

bin=$("$here/build.sh")
started=$SECONDS
# The host's own address (that of its default route), which Pods can reach.
host_ip=$(ip -4 -o route get 1.0.0.0 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')
[[ -n $host_ip ]] || host_ip=$(ip -4 -o addr show scope global | awk '{ sub(/\/.*/, "", $4); print $4; exit }')
[[ -n $host_ip || -z $with_node ]] || die "found no IPv4 address on this host for the node"

if [[ -e $state ]]; then
    if [[ -f $state/$MARKER ]]; then
        echo "Replacing the cluster in $state, which is not healthy" >&2
        stop_cluster "$state" || die "cannot stop the old cluster in $state"
        rm -rf "$state"
    elif [[ -n $(ls -A "$state") ]]; then
        die "$state exists and does not hold a Bouquet test cluster: choose another STATE_DIR"
    fi
fi
# Keys and kubeconfigs are for this user only; the components inherit the umask too.
umask 077
mkdir -p "$pki" "$state/logs" "$state/pids" "$state/etcd"
touch "$state/$MARKER"

# When anything below fails, stop what was started and keep the logs for a look.
finished=
on_exit() {
    [[ -n $finished ]] && return
    stop_cluster "$state" || true
    echo "The cluster did not come up; its logs are in $state/logs (the next up.sh replaces them)." >&2
}
trap on_exit EXIT

mapfile -t ports < <(free_ports 5)
etcd_port=${ports[0]} etcd_peer_port=${ports[1]} api_port=${ports[2]}
controller_manager_port=${ports[3]} scheduler_port=${ports[4]}

echo "Writing a CA and certificates in $pki" >&2
# P-256 keys: as good as RSA here and generated in milliseconds.
new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$pki/$1.key"; }
# new_ca NAME COMMON_NAME
new_ca() {
    new_key "$1"
    openssl req -x509 -new -key "$pki/$1.key" -subj "/CN=$2" -days 3650 -sha256 -out "$pki/$1.crt" \
        -config <(printf '[req]\ndistinguished_name=dn\n[dn]\n[ca]\n%s\n%s\n%s\n' \
            basicConstraints=critical,CA:TRUE keyUsage=critical,keyCertSign,cRLSign,digitalSignature \
            subjectKeyIdentifier=hash) -extensions ca
}
# issue NAME CA SUBJECT EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES]
issue() {
    local name=$1 ca=$2 subject=$3 usage=$4 names=${5:-}
    new_key "$name"
    openssl req -new -key "$pki/$name.key" -subj "$subject" -out "$pki/$name.csr"
    openssl x509 -req -in "$pki/$name.csr" -CA "$pki/$ca.crt" -CAkey "$pki/$ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days 365 -sha256 -out "$pki/$name.crt" \
        -extfile <(
            echo basicConstraints=critical,CA:FALSE
            echo keyUsage=critical,digitalSignature,keyEncipherment
            echo "extendedKeyUsage=$usage"
            [[ -n $names ]] && echo "subjectAltName=$names"
        ) 2>/dev/null
    rm "$pki/$name.csr"
}
loopback=IP:127.0.0.1,DNS:localhost
# etcd has a CA of its own: a client certificate of the cluster's CA (the admin's, say) must
# not open the database.
new_ca etcd-ca bouquet-etcd-ca
# etcd's gRPC gateway dials etcd's own client port with this certificate: it is a client too.
issue etcd-server etcd-ca /CN=etcd serverAuth,clientAuth "$loopback"
issue apiserver-etcd-client etcd-ca /CN=kube-apiserver-etcd-client clientAuth
new_ca ca bouquet-cluster-ca
issue apiserver ca /CN=kube-apiserver serverAuth \
    "$loopback${host_ip:+,IP:$host_ip},IP:$SERVICE_IP,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
# What the API server shows a kubelet (logs, exec, port-forward) once one joins.
issue apiserver-kubelet-client ca "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
issue admin ca "/O=system:masters/CN=bouquet-admin" clientAuth
# The built-in RBAC roles name these users. Each certificate also serves the component's
# own health endpoint.
issue kube-controller-manager ca /CN=system:kube-controller-manager serverAuth,clientAuth "$loopback"
issue kube-scheduler ca /CN=system:kube-scheduler serverAuth,clientAuth "$loopback"
# The aggregation layer: the API server proxies to extension API servers (metrics-server, say)
# with this client certificate, and the components, which authenticate their callers through
# the API server, expect its CA to be published (without it they log an error every few
# seconds).
new_ca front-proxy-ca bouquet-front-proxy-ca
issue front-proxy-client front-proxy-ca /CN=front-proxy-client clientAuth
# Signs and verifies service account tokens.
new_key service-account
openssl pkey -in "$pki/service-account.key" -pubout -out "$pki/service-account.pub"

# write_kubeconfig FILE CERTIFICATE: a kubeconfig that presents pki/CERTIFICATE.{crt,key}.
write_kubeconfig() {
    cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: bouquet
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority-data: $(base64 -w0 <"$pki/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(base64 -w0 <"$pki/$2.crt")
    client-key-data: $(base64 -w0 <"$pki/$2.key")
contexts:
- name: bouquet
  context:
    cluster: bouquet
    user: $2
current-context: bouquet
EOF
}
write_kubeconfig "$pki/kube-controller-manager.kubeconfig" kube-controller-manager
write_kubeconfig "$pki/kube-scheduler.kubeconfig" kube-scheduler

# start NAME PROGRAM ARGS...: runs a component in a session of its own (a Ctrl-C or a closed terminal
# of whoever called up.sh does not reach it), logging to logs/NAME.log. The shell writes its
# own id to the pid file and then becomes the component, so the id is the component's.
start() {
    local name=$1 i
    shift
    # shellcheck disable=SC2016 # expanded by that shell
    setsid bash -c 'echo $$ >"$0" && exec "$@"' "$state/pids/$name.pid" "$@" \
        </dev/null >"$state/logs/$name.log" 2>&1 9>&- &
    # Until the exec, the process is a shell that cluster_pids does not count.
    for i in {1..50}; do
        running "$name" && return
        sleep 0.1
    done
    die "$name did not start; the end of $state/logs/$name.log:"$'\n'"$(tail -n 20 "$state/logs/$name.log")"
}

# wait_until NAME SECONDS COMMAND...: waits for COMMAND to succeed while NAME runs.
wait_until() {
    local name=$1 deadline=$((SECONDS + $2))
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ! running "$name"; then
            echo "$name exited; the end of $state/logs/$name.log:" >&2
            tail -n 20 "$state/logs/$name.log" >&2
            exit 1
        fi
        if ((SECONDS > deadline)); then
            echo "$name is not healthy after $2 s; the end of $state/logs/$name.log:" >&2
            tail -n 20 "$state/logs/$name.log" >&2
            exit 1
        fi
        sleep 0.2
    done
}

# --unsafe-no-fsync: the database is thrown away with the cluster, so waiting for the disk
# on every write only slows the tests down. The peer port is unused by a single member but
# must not be etcd's default either.
start etcd "$bin/etcd" --name bouquet --data-dir "$state/etcd" --unsafe-no-fsync \
    --listen-client-urls "https://127.0.0.1:$etcd_port" \
    --advertise-client-urls "https://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "bouquet=http://127.0.0.1:$etcd_peer_port" \
    --cert-file "$pki/etcd-server.crt" --key-file "$pki/etcd-server.key" \
    --client-cert-auth --trusted-ca-file "$pki/etcd-ca.crt"
etcd_healthy() {
    curl -sf --max-time 2 --cacert "$pki/etcd-ca.crt" --cert "$pki/apiserver-etcd-client.crt" \
        --key "$pki/apiserver-etcd-client.key" "https://127.0.0.1:$etcd_port/health" | grep -q '"health":"true"'
}
wait_until etcd 30 etcd_healthy

# The admission plugins are the release's defaults. The API server advertises the host's
# address for the `kubernetes` Service (Endpoints may not hold a loopback address), and
# listens there too when Pods are to reach it.
start kube-apiserver "$bin/kube-apiserver" \
    --bind-address "$([[ -n $with_node ]] && echo 0.0.0.0 || echo 127.0.0.1)" --secure-port "$api_port" \
    ${host_ip:+--advertise-address "$host_ip"} \
    --kubelet-preferred-address-types InternalIP,Hostname \
    --kubelet-certificate-authority "$pki/ca.crt" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --etcd-servers "https://127.0.0.1:$etcd_port" --etcd-cafile "$pki/etcd-ca.crt" \
    --etcd-certfile "$pki/apiserver-etcd-client.crt" --etcd-keyfile "$pki/apiserver-etcd-client.key" \
    --authorization-mode Node,RBAC \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/service-account.pub" \
    --service-account-signing-key-file "$pki/service-account.key" \
    --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
    --requestheader-client-ca-file "$pki/front-proxy-ca.crt" \
    --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User \
    --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$pki/front-proxy-client.crt" \
    --proxy-client-key-file "$pki/front-proxy-client.key"
write_kubeconfig "$state/kubeconfig" admin
api_ready() { [[ $(admin_curl "https://127.0.0.1:$api_port/readyz") == ok ]]; }
wait_until kube-apiserver 120 api_ready

# Every controller ('*'), none left out. In particular the node lifecycle controller stays:
# the API server's TaintNodesByCondition admission taints every new Node
# node.kubernetes.io/not-ready:NoSchedule, and only that controller lifts the taint once the
# Node reports Ready, so without it no Pod is ever scheduled, on a kubelet's Node or on one
# registered by hand. (A hand-registered Node must renew its Lease and Ready condition while
# a test needs it, or the same controller marks it unreachable.) The node IPAM controller
# does nothing unless --allocate-node-cidrs is set, and the cloud controllers nothing
# without --cloud-provider. Leader election is off: there is one of each, and a restart
# must not wait out a lease.
start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$pki/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig "$pki/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig "$pki/kube-controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$controller_manager_port" \
    --tls-cert-file "$pki/kube-controller-manager.crt" \
    --tls-private-key-file "$pki/kube-controller-manager.key" \
    --controllers '*' --leader-elect=false \
    --use-service-account-credentials \
    --service-account-private-key-file "$pki/service-account.key" \
    --root-ca-file "$pki/ca.crt" \
    --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
    --service-cluster-ip-range "$SERVICE_CIDR"
start kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig "$pki/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig "$pki/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig "$pki/kube-scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$scheduler_port" \
    --tls-cert-file "$pki/kube-scheduler.crt" --tls-private-key-file "$pki/kube-scheduler.key" \
    --leader-elect=false
component_healthy() { [[ $(curl -sf --max-time 2 --cacert "$pki/ca.crt" "https://127.0.0.1:$1/healthz") == ok ]]; }
wait_until kube-controller-manager 60 component_healthy "$controller_manager_port"
wait_until kube-scheduler 60 component_healthy "$scheduler_port"

[[ -z $with_node ]] || start_node

# The clients of this cluster's release, for the user and the tests: the host's kubectl may be
# older than the cluster (kubectl supports one minor version either side of the API server).
mkdir -p "$state/bin"
ln -sf "$bin/kubectl" "$state/bin/kubectl"
ln -sf "$("$here/../helm.sh")" "$state/bin/helm"

finished=1
echo "The cluster in $state is up after $((SECONDS - started)) s: API server https://127.0.0.1:$api_port, logs in $state/logs" >&2
echo "$export_lines"
