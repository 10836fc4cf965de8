# shellcheck shell=bash disable=SC2034 # the variables are for the scripts that source this
# Sourced by up.sh and down.sh: where a test cluster keeps its state, and how its processes
# are found and stopped.

# The control plane's programs, in the order up.sh starts them.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler)
# A file every state folder of ours holds, so that neither script clears a folder it did not
# make (`down.sh /` must not remove anything).
MARKER=.bouquet-cluster

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

# Prints the absolute state folder: the argument, or the default.
state_dir() {
    realpath -m "${1:-${BOUQUET_CLUSTER_DIR:-/tmp/bouquet-cluster}}"
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

# Stops the control plane of the cluster in state folder $1, the last started first, so that
# no component spends its shutdown retrying one already gone: SIGTERM, then SIGKILL for what
# is still there after 10 s. Fails, naming them, if any process outlives that.
stop_cluster() {
    local state=$1 i component pids
    for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
        component=${COMPONENTS[i]}
        stop "$state" "$component" TERM 10 && continue
        echo "$component still runs 10 s after SIGTERM: sending SIGKILL" >&2
        stop "$state" "$component" KILL 5 && continue
        pids=$(cluster_pids "$state" "$component")
        echo "could not stop $component (process ${pids//$'\n'/ }) of the cluster in $state" >&2
        return 1
    done
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
