#!/usr/bin/env bash
# Stops the test cluster that up.sh started in STATE_DIR and removes STATE_DIR: SIGTERM to
# each component, the last started first, SIGKILL to one still there 10 s later, a check
# that no process of the cluster is left, then the folder. Fails if a process survives, and
# leaves the folder then. Nothing to stop and nothing to remove is not an error.
#
# What the node's claims hold (models, checkpoints, data) is kept: each bound volume's folder
# moves to CLAIMS_DIR/<namespace>/<claim>-<UTC time>/, and the next cluster starts with empty
# volumes. With --delete-claims it is deleted with the rest.
#
# Usage: scripts/cluster/down.sh [--delete-claims] [STATE_DIR]
#   STATE_DIR: default $BOUQUET_CLUSTER_DIR, else /tmp/bouquet-cluster
#   CLAIMS_DIR: $BOUQUET_CLAIMS_DIR, else /var/lib/bouquet/claims
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"

keep_claims=1
if [[ ${1:-} == --delete-claims ]]; then
    keep_claims=
    shift
fi
state=$(state_dir "${1:-}")
claims_dir=${BOUQUET_CLAIMS_DIR:-/var/lib/bouquet/claims}
if [[ -e $state && ! -f $state/$MARKER ]]; then
    die "$state does not hold a Bouquet test cluster; leaving it alone"
fi
# The lock up.sh holds while it starts a cluster.
if [[ -d $(dirname "$state") ]]; then
    exec 9<"$(dirname "$state")"
    flock 9
fi

if [[ ! -e $state && -z $(cluster_pids "$state") ]]; then
    echo "No cluster in $state: nothing to stop." >&2
    exit 0
fi
# Which claim each of the node's volumes is bound to, asked before the API server stops:
# lines of "<volume folder> <namespace> <claim>".
bound=
if [[ -n $keep_claims && -d $state/node/volumes && -x $state/bin/kubectl ]]; then
    bound=$("$state/bin/kubectl" --kubeconfig "$state/kubeconfig" --request-timeout 10s get pv -l bouquet.dev/cluster-volume=true \
        -o jsonpath='{range .items[?(@.spec.claimRef)]}{.spec.hostPath.path} {.spec.claimRef.namespace} {.spec.claimRef.name}{"\n"}{end}' \
        2>/dev/null) || echo "The API server does not answer: the claims' volumes are kept by folder name, not by claim" >&2
fi
stop_cluster "$state" || die "left $state in place"
if [[ -n $keep_claims && -d $state/node/volumes ]]; then
    stamp=$(date -u +%Y%m%dT%H%M%SZ)
    for volume in "$state"/node/volumes/*/; do
        volume=${volume%/}
        [[ -n $(ls -A "$volume") ]] || continue
        claim=$(awk -v v="$volume" '$1 == v { print $2 "/" $3 }' <<<"$bound")
        target=$claims_dir/${claim:-unknown/${volume##*/}}-$stamp
        mkdir -p "$(dirname "$target")"
        mv "$volume" "$target"
        echo "Kept what claim ${claim:-of volume ${volume##*/}} holds in $target" >&2
    done
fi
rm -rf "$state"
echo "Stopped the cluster in $state and removed its state." >&2
