#!/usr/bin/env bash
# The kind cluster of kind-config.yaml for the end-to-end tests (`make e2e-kind`), on a host
# with Docker and access to a container registry (kind's node images come from one; the
# machines Bouquet is developed on have neither, and run the same tests on a single-node
# cluster of their own instead: scripts/cluster/up.sh --node).
#   1. kind, built from its upstream Go module (cached);
#   2. the cluster `bouquet-e2e` (one control plane, two workers labelled as sites, the second
#      as a GPU node), created unless it exists;
#   3. Bouquet's images, built by scripts/images.sh on the registry's python:3.11 base, and
#      loaded into the nodes;
#   4. a route from this host to each node's Pod network, so that the tests' Prometheus on
#      this host can scrape the Pods (root only, as for the single-node cluster).
#
# Usage: scripts/kind.sh                set all of that up (idempotent)
#        scripts/kind.sh --kubeconfig   print the path of the cluster's kubeconfig
#        scripts/kind.sh --delete       delete the cluster and the routes
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
KIND_VERSION=v0.30.0 # its default node image is Kubernetes 1.34, kind-config.yaml's release
NAME=bouquet-e2e
cache=${BOUQUET_CACHE:-$HOME/.cache/bouquet}
kubeconfig=$cache/kind-$NAME.kubeconfig
die() { echo "kind.sh: $*" >&2; exit 1; }

if [[ ${1:-} == --kubeconfig ]]; then
    echo "$kubeconfig"
    exit 0
fi

kind=$cache/kind-$KIND_VERSION/kind
if [[ ! -x $kind ]]; then
    command -v go >/dev/null || die "building kind needs Go"
    echo "Building kind $KIND_VERSION" >&2
    GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN=$(dirname "$kind") go install "sigs.k8s.io/kind@$KIND_VERSION" >&2
fi

# pod_routes add|del: one route per node, to its Pod network through the node's address.
pod_routes() {
    local node cidr address
    while read -r node cidr address; do
        [[ -n $cidr && -n $address ]] || continue
        if [[ $1 == add ]]; then ip route replace "$cidr" via "$address"; else ip route del "$cidr" via "$address" 2>/dev/null || true; fi
    done < <(kubectl --kubeconfig "$kubeconfig" get nodes \
        -o jsonpath='{range .items[*]}{.metadata.name} {.spec.podCIDR} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}')
}

if [[ ${1:-} == --delete ]]; then
    [[ -f $kubeconfig ]] && pod_routes del
    "$kind" delete cluster --name "$NAME"
    rm -f "$kubeconfig"
    exit 0
fi

command -v docker >/dev/null && docker info >/dev/null 2>&1 || die "kind needs a running Docker daemon"
if ! "$kind" get clusters 2>/dev/null | grep -qx "$NAME"; then
    "$kind" create cluster --name "$NAME" --config "$root/kind-config.yaml" --kubeconfig "$kubeconfig" --wait 5m >&2
else
    "$kind" export kubeconfig --name "$NAME" --kubeconfig "$kubeconfig" >&2
fi
mapfile -t images < <(BOUQUET_IMAGE_BASE=python:3.11-slim-bookworm "$root/scripts/images.sh")
"$kind" load docker-image --name "$NAME" "${images[@]}" >&2
pod_routes add
echo "kind cluster $NAME is ready: export KUBECONFIG=$kubeconfig" >&2
