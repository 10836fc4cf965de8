#!/usr/bin/env bash
# Stops the test cluster that up.sh started in STATE_DIR and removes STATE_DIR: SIGTERM to
# each component, the last started first, SIGKILL to one still there 10 s later, a check
# that no process of the cluster is left, then the folder. Fails if a process survives, and
# leaves the folder then. Nothing to stop and nothing to remove is not an error.
#
# Usage: scripts/cluster/down.sh [STATE_DIR]   (default: $BOUQUET_CLUSTER_DIR, else /tmp/bouquet-cluster)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"

state=$(state_dir "${1:-}")
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
stop_cluster "$state" || die "left $state in place"
rm -rf "$state"
echo "Stopped the cluster in $state and removed its state." >&2
