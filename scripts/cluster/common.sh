# shellcheck shell=bash disable=SC2034 # the variables are for the scripts that source this
# Sourced by up.sh and down.sh: where a test cluster keeps its state, and how its processes
# are found and stopped.

# The cluster's programs, in the order up.sh starts them: the control plane, then (with
# --node) the node's.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy kube-router coredns)
# A file every state folder of ours holds, so that neither script clears a folder it did not
# make (`down.sh /` must not remove anything).
MARKER=.bouquet-cluster
# containerd's root folder on a node: in the cache, so that images loaded once stay loaded.
CONTAINERD_ROOT=${BOUQUET_CACHE:-$HOME/.cache/bouquet}/containerd

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

# Prints the absolute state folder: the argument, or the default.
state_dir() {
    realpath -m "${1:-${BOUQUET_CLUSTER_DIR:-/tmp/bouquet-cluster}}"
}

# free_ports N: prints N TCP ports that nothing listens on, below the kernel's ephemeral
# range (32768 and up) so that no outgoing connection takes one between this check and the
# bind, below the NodePort range (30000-32767), which kube-router's firewall leaves open to
# every Pod on the node's own addresses, and not the components' defaults (2379, 6443,
# 10250, ...): a second cluster, or a real one, may hold those.
free_ports() {
    local taken port count=0
    taken=" $(ss -Htuan | awk '{ sub(/.*:/, "", $5); printf "%s ", $5 }') "
    while ((count < $1)); do
        port=$((20000 + RANDOM % 10000))
        [[ $taken == *" $port "* ]] && continue
        taken+="$port "
        echo "$port"
        count=$((count + 1))
    done
}

# Prints the process ids of the control plane of the cluster in state folder $1 (only of the
# components named after it, if any). A process counts when it runs one of the components
# and names that folder on its command line (each reads its certificates from there), so a
# stale pid file or a reused process id never makes another process ours, and a component
# whose pid file was never written is still found.
cluster_pids() {
    local state=$1 components=("${@:2}") dir exe
    ((${#components[@]})) || components=("${COMPONENTS[@]}")
    for dir in /proc/[0-9]*; do
        exe=$(readlink "$dir/exe" 2>/dev/null) || continue
        exe=${exe% (deleted)}
        [[ " ${components[*]} " == *" ${exe##*/} "* ]] || continue
        [[ $(tr '\0' ' ' <"$dir/cmdline" 2>/dev/null) == *"$state/"* ]] && echo "${dir#/proc/}"
    done
    return 0
}

# The components that run only on a cluster with a node.
NODE_COMPONENTS="containerd kubelet kube-proxy kube-router coredns"

# Stops the cluster in state folder $1, the last started first, so that no component spends
# its shutdown retrying one already gone; a node's Pods are removed before containerd stops,
# and what the node left on the host after it. Fails, naming them, if any process outlives
# that.
stop_cluster() {
    local state=$1 i
    for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
        if [[ ${COMPONENTS[i]} == containerd && -d $state/node ]]; then
            remove_pods "$state"
        fi
        stop_component "$state" "${COMPONENTS[i]}" || return 1
    done
    [[ ! -d $state/node ]] || clean_host "$state"
}

# stop_component STATE COMPONENT: SIGTERM, then SIGKILL for what is still there after 10 s.
stop_component() {
    local state=$1 component=$2 pids
    stop "$state" "$component" TERM 10 && return
    echo "$component still runs 10 s after SIGTERM: sending SIGKILL" >&2
    stop "$state" "$component" KILL 5 && return
    pids=$(cluster_pids "$state" "$component")
    echo "could not stop $component (process ${pids//$'\n'/ }) of the cluster in $state" >&2
    return 1
}

# remove_pods STATE: stops and removes every Pod sandbox of the node through containerd's
# CRI (the kubelet is stopped first, so none comes back): their containers, network
# namespaces and addresses, and the CNI plugins' iptables rules go with them.
remove_pods() {
    local state=$1 socket=$1/node/containerd/containerd.sock
    [[ -n $(cluster_pids "$state" containerd) && -S $socket ]] || return 0
    CONTAINER_RUNTIME_ENDPOINT=unix://$socket IMAGE_SERVICE_ENDPOINT=unix://$socket \
        timeout 180 "$(<"$state/node/bin")/crictl" --timeout 120s rmp --all --force >/dev/null 2>&1 ||
        echo "crictl could not remove every Pod of the node; stopping what is left by force" >&2
}

# clean_host STATE: removes what the node of the cluster in STATE left on the host once its
# components are stopped: containerd's shims and any process still in a Pod's cgroup, the
# kubepods cgroups, every mount under the state folder or containerd's root, the bq0
# bridge, the iptables rules and chains of kube-proxy, kube-router, the kubelet and the CNI
# plugins (KUBE-* and CNI-*: the node is the only one on this host, see node.sh), kube-router's
# ipsets (KUBE-SRC-*, KUBE-DST-*), and ip_forward and bridge netfilter as they were before.
# Each step is safe to repeat.
clean_host() {
    local state=$1 node=$1/node bin pids pid cgroup i mounts table command chain chains rule
    bin=$(<"$node/bin")
    # The shims name containerd's socket, which is in the state folder.
    for i in TERM KILL; do
        pids=$(for pid in /proc/[0-9]*; do
            [[ $(readlink "$pid/exe" 2>/dev/null) == */containerd-shim* &&
                $(tr '\0' ' ' <"$pid/cmdline" 2>/dev/null) == *"$state/"* ]] && echo "${pid#/proc/}"
        done)
        # shellcheck disable=SC2086 # one id a word
        [[ -n $pids ]] && kill -"$i" $pids 2>/dev/null && sleep 1
    done
    # Depth first, so that each folder is empty of children when it is removed.
    for i in 1 2 3; do
        for cgroup in /sys/fs/cgroup/*/kubepods; do
            [[ -d $cgroup ]] || continue
            find "$cgroup" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
            sleep 0.5
            find "$cgroup" -depth -type d -exec rmdir {} + 2>/dev/null || true
        done
    done
    # Deepest first; a mount that is still busy is detached lazily.
    mounts=$(awk -v a="$state/" -v b="$CONTAINERD_ROOT/" \
        'index($5, a) == 1 || index($5, b) == 1 || $5 == substr(a, 1, length(a) - 1) { print length($5), $5 }' /proc/self/mountinfo |
        sort -rn | cut -d' ' -f2-)
    while IFS= read -r i; do
        [[ -n $i ]] && { umount "$i" 2>/dev/null || umount -l "$i"; }
    done <<<"$mounts"
    # Network namespaces of Pods whose sandboxes were not torn down through CRI (containerd
    # gone first, a teardown that failed): those CNI made while this node ran are its own.
    # Deleting one removes its end of the veth pair too.
    for i in /run/netns/cni-*; do
        [[ -e $i && $i -nt $node/bin ]] && ip netns delete "${i##*/}" 2>/dev/null
    done
    ip link delete bq0 2>/dev/null || true
    "$bin/kube-proxy" --cleanup >/dev/null 2>&1 || true
    for command in iptables ip6tables; do
        command -v "$command" >/dev/null || continue
        for table in filter nat mangle; do
            # Jumps from the built-in chains first, then the chains themselves.
            "$command" -t "$table" -S 2>/dev/null | grep -E '^-A [A-Z]+ .*-j (KUBE|CNI)-' | grep -vE '^-A (KUBE|CNI)-' |
                while IFS= read -r rule; do
                    eval "$command -t $table -D ${rule#-A }" 2>/dev/null || true
                done
            # Emptied first, all of them: a chain may be deleted only once nothing jumps to it.
            chains=$("$command" -t "$table" -S 2>/dev/null | sed -n 's/^-N \(\(KUBE\|CNI\)-[^ ]*\)$/\1/p')
            for chain in $chains; do "$command" -t "$table" -F "$chain" 2>/dev/null || true; done
            for chain in $chains; do "$command" -t "$table" -X "$chain" 2>/dev/null || true; done
        done
    done
    # Once no rule refers to them (an ipset in use cannot be destroyed).
    if command -v ipset >/dev/null; then
        for i in $(ipset list -n 2>/dev/null | grep -E '^(inet6:)?KUBE-(SRC|DST)-'); do
            ipset destroy "$i" 2>/dev/null || true
        done
    fi
    [[ -f $node/ip_forward.before ]] && cat "$node/ip_forward.before" >/proc/sys/net/ipv4/ip_forward
    [[ -f $node/bridge-nf-call-iptables.before ]] &&
        cat "$node/bridge-nf-call-iptables.before" >/proc/sys/net/bridge/bridge-nf-call-iptables
    find /var/log/containers -maxdepth 1 -type l -lname "$state/*" -delete 2>/dev/null || true
    [[ -s /run/bouquet-node && $(</run/bouquet-node) == "$state" ]] && rm -f /run/bouquet-node
    return 0
}

# stop STATE COMPONENT SIGNAL SECONDS: sends SIGNAL and waits up to SECONDS for the
# COMPONENT of the cluster in STATE to be gone.
stop() {
    local state=$1 component=$2 signal=$3 deadline=$((SECONDS + $4)) pids
    pids=$(cluster_pids "$state" "$component")
    # shellcheck disable=SC2086 # one id a word
    [[ -n $pids ]] && kill -"$signal" $pids 2>/dev/null
    while [[ -n $pids ]]; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
        pids=$(cluster_pids "$state" "$component")
    done
}
